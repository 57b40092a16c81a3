"""vpn-tcp for the whole machine, run inside a network namespace made by the test.

The namespace is a "laptop" whose only way to the cluster's networks is tpconf: it reaches the
API server (a local address of the host) through a veth, but the host drops everything it would
forward from that veth, so pod and Service addresses, and the two extra host addresses below,
are reachable only through tunnels. Processes that are not children of tpconf (run with
`ip netns exec`) resolve cluster names and connect, as on a machine with Telepresence's VPN.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import helloworld, wait_until, write_config
from tests.e2e.laptop import Laptop, NetnsUp, netns_down

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(420)]


def config(ns: str, laptop: Laptop, *, second: bool) -> str:
    text = f"""\
version: 1
namespace: {ns}
defaults:
  method: vpn-tcp
  volumes: false
deployments:
  vpn1:
    new: true
    also-proxy: [{laptop.listed}]
"""
    if second:
        text += "  vpn2:\n    new: true\n"
    return text


def test_vpn_tcp_serves_every_process_of_the_machine(
    cluster: E2ECluster, namespace: str, tmp_path: Path, laptop: Laptop
) -> None:
    ns = namespace
    helloworld(cluster, ns)

    def fetch(url: str) -> str:
        return laptop.run("curl", "-s", "--max-time", "8", url).stdout

    # Before tpconf: the laptop reaches nothing of the cluster.
    assert "Welcome" not in fetch(f"http://helloworld.{ns}.svc.cluster.local/")

    write_config(tmp_path, config(ns, laptop, second=True))
    up = NetnsUp(cluster, tmp_path, laptop).start()
    try:
        up.wait_for(r"^vpn1 ready")
        up.wait_for(r"^vpn2 ready")
        for host in (f"helloworld.{ns}.svc.cluster.local", f"helloworld.{ns}", "helloworld"):
            assert "Welcome to nginx!" in fetch(f"http://{host}/"), (host, up.output[-2000:])
        # A Service created while up runs.
        helloworld(cluster, ns, name="later")
        wait_until(lambda: "Welcome" in fetch(f"http://later.{ns}/"), 60, "the later Service")
        # also-proxy: the listed address goes through the cluster, the other one does not.
        assert fetch(f"http://{laptop.listed}:8099/") == f"marker {laptop.listed}\n"
        assert fetch(f"http://{laptop.unlisted}:8099/") == ""
        # vpn2 leaves; vpn1 keeps serving.
        mark = len(up.output)
        write_config(tmp_path, config(ns, laptop, second=False))
        up.wait_for(r"^vpn2 stopped \(removed from the file\)", after=mark)
        assert "Welcome to nginx!" in fetch(f"http://helloworld.{ns}/")
        assert "TPCONF" in laptop.nat_rules()
    finally:
        up.kill()  # kill -9: the rules and the DNS redirect stay behind...
    assert "TPCONF" in laptop.nat_rules()
    down = netns_down(cluster, tmp_path, laptop)
    assert down.returncode == 0, down.stderr
    assert "removed iptables chain TPCONF-OUTPUT" in down.stdout
    assert "TPCONF" not in laptop.nat_rules()  # ...until `tpconf down` removes them
    assert "Welcome" not in fetch(f"http://helloworld.{ns}/")
