#!/usr/bin/env bash
# Stop the local cluster and remove its state: processes, pod sandboxes and mounts, CNI state,
# kube-proxy's and CNI's iptables chains, etcd data. Keeps the built binaries and the PKI.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
# lib.sh `stop` signals only the process a pid file names (pid and start time): never one that
# got a stopped component's pid later.
stop kubelet
# The kubelet is gone: stop every pod's containers and sandboxes through containerd's CRI view.
if [ -S "$CONTAINERD_SOCK" ]; then
  for t in $(ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
  sleep 1
  for c in $(ctr -a "$CONTAINERD_SOCK" -n k8s.io containers ls -q 2>/dev/null); do
    ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
    ctr -a "$CONTAINERD_SOCK" -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
  done
fi
for c in kube-proxy kube-scheduler kube-controller-manager kube-apiserver etcd containerd; do stop "$c"; done
# Leftover shims of killed sandboxes.
pkill -KILL -f 'containerd-shim-runc-v2 -namespace k8s.io' 2>/dev/null || true
# Pod volumes (tmpfs secrets, projected tokens) and sandbox network namespaces.
grep -E ' /var/lib/kubelet/pods/| /run/containerd/io.containerd| /run/netns/cni-' /proc/mounts \
  | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
rm -rf /var/lib/kubelet/pods /var/lib/cni/networks/tpconf-net /var/lib/cni/results
ip link delete cni0 2>/dev/null || true
"$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
for table in nat filter mangle; do
  iptables-save -t "$table" 2>/dev/null | awk '/^:(CNI-|KUBE-)/ {print substr($1, 2)}' | while read -r chain; do
    iptables -t "$table" -S 2>/dev/null | grep -E -- "-j $chain( |$)" | sed 's/^-A/-D/' \
      | while read -r rule; do eval iptables -t "$table" "$rule" 2>/dev/null || true; done
  done
  iptables-save -t "$table" 2>/dev/null | awk '/^:(CNI-|KUBE-)/ {print substr($1, 2)}' | while read -r chain; do
    iptables -t "$table" -F "$chain" 2>/dev/null || true
  done
  iptables-save -t "$table" 2>/dev/null | awk '/^:(CNI-|KUBE-)/ {print substr($1, 2)}' | while read -r chain; do
    iptables -t "$table" -X "$chain" 2>/dev/null || true
  done
done
rm -rf "$STATE/etcd"
log "cluster stopped"
