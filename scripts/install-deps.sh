#!/usr/bin/env bash
# Debian packages tpconf's tests, demo and local cluster use. Idempotent; needs root.
set -euo pipefail
pkgs=(
  # the local cluster's runtime (tests/cluster/): containers, pod networking, iptables
  containerd runc containernetworking-plugins iptables conntrack iproute2
  # images without a registry: a Docker engine for builds, debootstrap for the base, gcc for pause
  docker.io debootstrap libc6-dev gcc
  # tpconf at run time: inject-tcp (torsocks), volumes (sshfs, FUSE), real-path volumes (proot)
  torsocks sshfs fuse3 proot openssh-client
  # tests: a real OpenSSH server, curl as a real client
  openssh-server openssh-sftp-server curl python3-venv
)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v go >/dev/null || { echo "Go (>= 1.24) is needed to build the local cluster" >&2; exit 1; }
