#!/usr/bin/env bash
# The reusable "build this Dockerfile and load it into the cluster" step, without any registry:
#   tests/cluster/load-image.sh CONTEXT_DIR IMAGE_REF      e.g. tpconf/agent tpconf/agent:0.1.0
# Starts the local Docker engine if needed (see images/lib.sh), makes the debian:bookworm-slim base
# with debootstrap if the Dockerfile needs it and it is missing, builds with `docker build --network
# host` (skipped when an image built from the identical context exists), then imports the image into
# the cluster's containerd (namespace k8s.io; skipped when the same image is already there, and
# skipped with a note when the cluster's containerd is not running: run this again after up.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=images/lib.sh
. "$here/images/lib.sh"

[ $# -eq 2 ] || { echo "usage: $0 CONTEXT_DIR IMAGE_REF" >&2; exit 2; }
ctx=$1 ref=$2
[ -d "$ctx" ] || die "no such build context: $ctx"
tag=${ref##*/}
if [[ $tag != *:* || ${tag##*:} == latest || $ref == *@* ]]; then
  die "$ref: use a fixed, non-latest tag (pods must never try to pull it)"
fi

lock
ensure_dockerd
build_image "$ctx" "$ref"
if cluster_containerd_up; then
  import_image "$ref"
else
  log "cluster containerd ($CLUSTER_CONTAINERD) is not running: built $ref, not imported"
fi
