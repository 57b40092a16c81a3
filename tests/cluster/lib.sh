# Shared settings of the local test cluster, sourced by up.sh, down.sh and friends.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
STATE=${TPCONF_CLUSTER_STATE:-/var/lib/tpconf-cluster}
BIN=${TPCONF_CLUSTER_BIN:-$STATE/bin}
PKI=$STATE/pki
RUN=$STATE/run
LOGS=$STATE/logs
KUBECONFIG_ADMIN=$STATE/admin.kubeconfig
CONTAINERD_SOCK=/run/containerd/containerd.sock
SERVICE_CIDR=10.0.0.0/24
FIRST_SERVICE_IP=10.0.0.1
DNS_SERVICE_IP=10.0.0.10
POD_CIDR=10.88.0.0/16
CLUSTER_DOMAIN=cluster.local
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
NODE=$(hostname)
node_ip() {
  local dev
  dev=$(ip -4 route show default | awk '{print $5; exit}')
  ip -4 -o addr show dev "$dev" | awk '{print $4}' | cut -d/ -f1 | head -n1
}
kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
# start NAME CMD...: run a component in the background, its own session, logging to $LOGS/NAME.log
start() {
  local name=$1; shift
  if alive "$name"; then return 0; fi
  log "starting $name"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}
# wait_for DESC SECONDS CMD...: poll CMD until it succeeds
wait_for() {
  local desc=$1 secs=$2 i; shift 2
  for ((i = 0; i < secs * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out after ${secs}s waiting for $desc"; return 1
}
