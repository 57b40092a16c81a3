# Shared settings and helpers of the local test cluster, sourced by up.sh, down.sh and friends.
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
# Every process the scripts run, in start order (CoreDNS runs in the cluster: start_dns).
COMPONENTS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

# proc_start PID: when PID started (clock ticks after boot, /proc/PID/stat field 22); fails if
# PID does not run (or is a zombie). A pid is reused after its process exits; pid and start
# time together name one process.
proc_start() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  # shellcheck disable=SC2086 # the fields after "pid (comm) ", split on purpose
  set -- ${stat##*) }
  [ "$1" != Z ] && [ "$1" != X ] && echo "${20}"
}
# alive NAME: the process NAME's pid file names runs. The file holds "PID START"; a file of an
# older script (the pid alone) counts only if that pid still runs NAME's program.
alive() {
  local pid start now argv0
  [ -f "$RUN/$1.pid" ] || return 1
  read -r pid start < "$RUN/$1.pid" || [ -n "${pid:-}" ] || return 1
  now=$(proc_start "$pid") || return 1
  if [ -n "${start:-}" ]; then [ "$now" = "$start" ]; return; fi
  argv0=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -n1) || return 1
  [ "$(basename "$argv0")" = "$1" ]
}
# start NAME CMD...: run a component in the background, its own session, logging to
# $LOGS/NAME.log, unless it runs already
start() {
  local name=$1 pid; shift
  if alive "$name"; then return 0; fi
  if [ -f "$RUN/$name.pid" ]; then log "$name is not running: starting it again"; else log "starting $name"; fi
  # Not a process-group leader here (no job control), so setsid execs in place: $! is NAME's pid.
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid $(proc_start "$pid" || echo 0)" > "$RUN/$name.pid"
}
# stop NAME: SIGTERM, up to 5 s, then SIGKILL; only the process the pid file names (never a
# process that got its pid later)
stop() {
  local name=$1 pid
  if alive "$name"; then
    read -r pid _ < "$RUN/$name.pid"
    log "stopping $name"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do alive "$name" || break; sleep 0.1; done
    alive "$name" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$RUN/$name.pid"
}
# restart NAME CMD...: stop NAME if it runs, start it
restart() { stop "$1"; start "$@"; }
# write_if_changed FILE [MODE] < CONTENT: replace FILE (atomically) only if CONTENT differs; true
# if it was written. Some components watch their config file (kube-proxy exits when it changes),
# and a reader must never see half a file.
write_if_changed() {
  local file=$1 mode=${2:-644} tmp
  tmp=$(mktemp "$file.XXXXXX")
  cat > "$tmp"
  if [ -f "$file" ] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$file"
  log "wrote $file"
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
# dns_answers: cluster DNS answers for kubernetes.default (a Service VIP through kube-proxy, the
# pod network and CoreDNS all work)
dns_answers() {
  python3 - "$DNS_SERVICE_IP" <<'PY'
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
for label in "kubernetes.default.svc.cluster.local".split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.sendto(q, (sys.argv[1], 53)); r = s.recv(512)
sys.exit(0 if struct.unpack(">H", r[6:8])[0] > 0 else 1)
PY
}
