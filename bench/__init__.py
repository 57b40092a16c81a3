"""tpconf's benchmark suite (issue 7): ``python -m bench [--quick]``.

Runs against the cluster of ``$KUBECONFIG`` in its own namespace ``tpconf-bench-<random>``
(deleted at the end, even on failure), measures every compared variant interleaved in the same
run, and prints one table (median, min, max, ratio to the row's reference, the project's performance
target, verdict); ``bench/out/results.json`` holds the samples. Results: ``bench/RESULTS.md``.
"""
