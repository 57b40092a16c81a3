#!/usr/bin/env bash
# Every image the local cluster and the e2e tests need, built without a registry and imported into
# the cluster's containerd (namespace k8s.io) under fixed, non-latest names:
#   registry.k8s.io/pause:3.10.1             pause.c from the pinned k8s module, static, FROM scratch
#   registry.k8s.io/coredns/coredns:<pin>    the CoreDNS binary built by build.sh, FROM scratch
#   tpconf.local/nginx:1                     helloworld scenario: nginx on :80, default welcome page
#   tpconf.local/debian:12                   in-cluster test client: curl, dig, ip, ps, nc, python3
#   tpconf/agent:0.1.0                       the proxy agent (tpconf/agent/Dockerfile)
# Idempotent: an image built from an identical context is not rebuilt, an image already in the
# cluster's containerd is not imported again.
#   tests/cluster/images.sh          build all; import when the cluster's containerd runs
#   tests/cluster/images.sh import   same, but the cluster's containerd must run (up.sh calls this
#                                    after starting containerd and before the kubelet)
#   tests/cluster/images.sh build    build only
#   tests/cluster/images.sh stop-docker   stop the Docker engine this script started (images stay)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=images/lib.sh
. "$here/images/lib.sh"
bin=${TPCONF_CLUSTER_BIN:-$STATE/bin}
mode=${1:-all}
case "$mode" in
  all | build | import) ;;
  stop-docker) lock; stop_docker; exit 0 ;;
  *) echo "usage: $0 [all|build|import|stop-docker]" >&2; exit 2 ;;
esac

PAUSE_REF=registry.k8s.io/pause:3.10.1
COREDNS_REF=registry.k8s.io/coredns/coredns:${COREDNS_VERSION}
AGENT_REF=tpconf/agent:0.1.0
t_all=$(now)
missing=()
refs=()

# stage NAME -> a fresh copy of images/NAME under $STATE/image-contexts (for contexts with binaries)
stage() {
  local dir=$STATE/image-contexts/$1
  mkdir -p "$dir"
  find "$dir" -mindepth 1 -maxdepth 1 ! -name "$2" -exec rm -rf {} +
  cp -a "$here/images/$1/." "$dir/"
  echo "$dir"
}

pause_c() {
  local c
  for c in "$bin/pause.c" "$(go env GOMODCACHE 2>/dev/null)/k8s.io/kubernetes@${KUBE_VERSION}/build/pause/linux/pause.c"; do
    [ -f "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

lock
ensure_dockerd

# pause: compiled like upstream build/pause/Makefile (static, stripped); needs gcc + libc6-dev.
if src=$(pause_c); then
  ctx=$(stage pause pause)
  if [ ! -x "$ctx/pause" ] || [ "$src" -nt "$ctx/pause" ]; then
    gcc -Os -Wall -Werror -static -DVERSION=v3.10.1-tpconf -o "$ctx/pause" "$src"
    strip "$ctx/pause"
  fi
  build_image "$ctx" "$PAUSE_REF" && refs+=("$PAUSE_REF")
else
  missing+=("pause.c (run tests/cluster/build.sh kubernetes)")
fi

if [ -x "$bin/coredns" ]; then
  ctx=$(stage coredns coredns)
  cmp -s "$bin/coredns" "$ctx/coredns" || cp -p "$bin/coredns" "$ctx/coredns"
  build_image "$ctx" "$COREDNS_REF" && refs+=("$COREDNS_REF")
else
  missing+=("$bin/coredns (run tests/cluster/build.sh coredns)")
fi

build_image "$here/images/nginx" tpconf.local/nginx:1 && refs+=(tpconf.local/nginx:1)
build_image "$here/images/debian" tpconf.local/debian:12 && refs+=(tpconf.local/debian:12)
build_image "$repo/tpconf/agent" "$AGENT_REF" && refs+=("$AGENT_REF")

if [ "$mode" != build ]; then
  if cluster_containerd_up; then
    for r in "${refs[@]}"; do import_image "$r"; done
  elif [ "$mode" = import ]; then
    die "the cluster's containerd ($CLUSTER_CONTAINERD) is not running"
  else
    log "the cluster's containerd ($CLUSTER_CONTAINERD) is not running: images built, not imported"
    log "(up.sh imports them with '$0 import' once containerd runs)"
  fi
fi
log "done in $(elapsed "$t_all")s"
if [ ${#missing[@]} -gt 0 ]; then
  for m in "${missing[@]}"; do log "missing input: $m"; done
  exit 1
fi
