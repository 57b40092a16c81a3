#!/usr/bin/env bash
# Build the local cluster's binaries from the Go module proxy: Kubernetes (pinned), etcd, CoreDNS.
# Idempotent: a binary that exists at the pinned version is not rebuilt. The Go module and build
# caches are the default ones, so a second build (and CI on the same machine) reuses them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
out=${TPCONF_CLUSTER_BIN:-/var/lib/tpconf-cluster/bin}
work=${TPCONF_CLUSTER_BUILD:-/var/lib/tpconf-cluster/build}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$out" "$work"

stamp_ok() { [ -f "$out/.$1.version" ] && [ "$(cat "$out/.$1.version")" = "$2" ]; }

build_kubernetes() {
  stamp_ok kubernetes "$KUBE_VERSION" && return 0
  local sv="v0.${KUBE_VERSION#v1.}" minor gomod staging dir="$work/k8s"
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  # The staging modules are read from the pinned go.mod itself, so a new pin needs no list edit.
  gomod=$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$gomod")
  go mod init example.invalid/k8sbuild >/dev/null 2>&1
  go mod edit -go=1.24.0 -godebug=default=go1.24 -require="k8s.io/kubernetes@${KUBE_VERSION}"
  for m in $staging; do go mod edit -replace="${m}=${m}@${sv}"; done
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  go mod tidy
  local ldf="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X $p.gitVersion=${KUBE_VERSION} -X $p.gitMajor=1 -X $p.gitMinor=${minor}"
    ldf="$ldf -X $p.gitTreeState=clean -X $p.buildDate=2026-01-01T00:00:00Z"
  done
  go build -p 2 -trimpath -tags=selinux,notest,grpcnotrace -ldflags="$ldf" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
  cp "$(go env GOMODCACHE)/k8s.io/kubernetes@${KUBE_VERSION}/build/pause/linux/pause.c" "$out/pause.c"
  chmod u+w "$out/pause.c"
  echo "$KUBE_VERSION" > "$out/.kubernetes.version"
}

build_etcd() {
  stamp_ok etcd "$ETCD_VERSION" && return 0
  local dir="$work/etcd"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init example.invalid/etcdbuild >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" "go.etcd.io/etcd/etcdctl/v3@${ETCD_VERSION}"
  go build -trimpath -ldflags='-s -w' -o "$out/etcd" go.etcd.io/etcd/server/v3
  go build -trimpath -ldflags='-s -w' -o "$out/etcdctl" go.etcd.io/etcd/etcdctl/v3
  echo "$ETCD_VERSION" > "$out/.etcd.version"
}

build_coredns() {
  stamp_ok coredns "$COREDNS_VERSION" && return 0
  local dir="$work/coredns"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  GOBIN="$out" go install -trimpath -ldflags='-s -w' "github.com/coredns/coredns@${COREDNS_VERSION}"
  echo "$COREDNS_VERSION" > "$out/.coredns.version"
}

what=${1:-all}
case "$what" in
  kubernetes) build_kubernetes ;;
  etcd) build_etcd ;;
  coredns) build_coredns ;;
  all) build_etcd; build_coredns; build_kubernetes ;;
  *) echo "usage: $0 [all|kubernetes|etcd|coredns]" >&2; exit 2 ;;
esac
