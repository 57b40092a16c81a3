"""The tpconf agent image: its entrypoint and the intercept router (docs/agent.md).

These files run inside the image with Debian's python3 and the standard library only; tpconf
itself never imports them (tests do).
"""
