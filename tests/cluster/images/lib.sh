# Shared by images.sh and load-image.sh (sourced, not executed): the local Docker engine that builds
# images, the locally made debian:bookworm-slim base, and the import into the cluster's containerd.
# See ../../../docs/agent.md ("Images without a registry") for why things are done this way.

STATE=${TPCONF_CLUSTER_STATE:-/var/lib/tpconf-cluster}
# The cluster's containerd (started by up.sh); images must land in its k8s.io namespace for CRI.
CLUSTER_CONTAINERD=${TPCONF_CLUSTER_CONTAINERD:-/run/containerd/containerd.sock}
# Docker gets a containerd of its own. dockerd 20.10 silently adopts /run/containerd/containerd.sock
# when that socket exists, which would tie the image builds to the cluster's lifetime (and put
# docker's build containers into the cluster's containerd) depending on start order.
DOCKER_CONTAINERD=/run/docker/containerd/containerd.sock
DOCKER_SOCK=/run/docker.sock
# Debian's client matches the Debian engine (20.10); a newer client elsewhere on PATH may insist on
# buildx, which is not installed.
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
export DOCKER_HOST=unix://$DOCKER_SOCK DOCKER_BUILDKIT=0
BASE_IMAGE=debian:bookworm-slim

lock() { # one images.sh/load-image.sh at a time (they share dockerd start-up and the base image)
  mkdir -p "$STATE"
  exec 9>"$STATE/images.lock"
  flock 9
}

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
# elapsed START -> seconds since START, one decimal
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

sock_alive() { # sock_alive SOCKET -> a containerd answers on SOCKET
  [ -S "$1" ] && ctr -a "$1" version >/dev/null 2>&1
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(($(date +%s) + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
  : "$what"
}

ensure_dockerd() {
  "$DOCKER" version >/dev/null 2>&1 && return 0
  local t0 logf=$STATE/dockerd.log
  t0=$(now)
  mkdir -p "$STATE" /run/docker/containerd
  if ! sock_alive "$DOCKER_CONTAINERD"; then
    cat >"$STATE/docker-containerd.toml" <<'TOML'
version = 2
root = "/var/lib/docker/containerd/daemon"
state = "/run/docker/containerd/daemon"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/docker/containerd/containerd.sock"
TOML
    # Not a process-group leader here, so setsid execs in place and $! is containerd's pid.
    # 9>&-: the daemon must not inherit the images lock, or it would hold it for its lifetime.
    setsid containerd --config "$STATE/docker-containerd.toml" </dev/null >>"$STATE/docker-containerd.log" 2>&1 9>&- &
    echo $! >"$STATE/docker-containerd.pid"
    wait_for 30 "docker's containerd" sock_alive "$DOCKER_CONTAINERD" ||
      die "docker's containerd did not start; see $STATE/docker-containerd.log"
  fi
  # --iptables=false --bridge=none: dockerd touches no iptables rule or policy (otherwise it sets the
  # FORWARD policy to DROP, which cuts off pod traffic through the CNI bridge) and creates no docker0.
  # Builds use `--network host` instead (RUN apt-get needs the network); nothing else runs here.
  setsid dockerd --host "unix://$DOCKER_SOCK" --containerd "$DOCKER_CONTAINERD" \
    --pidfile "$STATE/dockerd.pid" --iptables=false --ip6tables=false --bridge=none --ip-masq=false \
    </dev/null >>"$logf" 2>&1 9>&- &
  wait_for 60 dockerd "$DOCKER" version || die "dockerd did not start; see $logf"
  log "dockerd started in $(elapsed "$t0")s (log: $logf)"
}

stop_docker() { # stop the dockerd and containerd that ensure_dockerd started (by their pid files)
  local name pidf pid
  for name in dockerd docker-containerd; do
    pidf=$STATE/$name.pid
    [ -f "$pidf" ] || continue
    pid=$(cat "$pidf")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      log "stopped $name ($pid)"
    fi
    rm -f "$pidf"
  done
}

debian_mirror() { # the Debian mirror this machine's apt uses (deb.debian.org by default)
  if [ -n "${TPCONF_DEBIAN_MIRROR:-}" ]; then echo "$TPCONF_DEBIAN_MIRROR"; return; fi
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -Eo 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ')
  echo "${m:-http://deb.debian.org/debian}"
}

ensure_base_image() { # debian:bookworm-slim from debootstrap (done once; cached as a docker image)
  "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  local t0 root mirror
  t0=$(now)
  mirror=$(debian_mirror)
  mirror=${mirror%/}
  root=$(mktemp -d "$STATE/rootfs.XXXXXX")
  log "debootstrap --variant=minbase bookworm from $mirror (once; takes a few minutes)"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$STATE/debootstrap.log" 2>&1 ||
    { rm -rf "$root"; die "debootstrap failed; see $STATE/debootstrap.log"; }
  # Like Debian's official slim image: no docs/man pages/translations in derived images, no apt caches.
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  cat >"$root/etc/apt/apt.conf.d/slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
EOF
  # Package scripts must not try to start services inside image builds.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -c . |
    "$DOCKER" import -c 'CMD ["/bin/bash"]' \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  log "built $BASE_IMAGE in $(elapsed "$t0")s"
}

context_hash() { # context_hash DIR -> digest of every file (path, mode, content) in the build context
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z |
    xargs -0 -r sh -c 'for f; do printf "%s %s\n" "$f" "$(stat -c %a "$f")"; sha256sum <"$f"; done' _) |
    sha256sum | cut -c1-32
}

docker_ref() { # docker_ref REF -> the reference as docker prints it (docker.io/library/ stripped)
  local r=${1#docker.io/}
  echo "${r#library/}"
}

normalize_ref() { # normalize_ref REF -> the fully qualified name containerd stores after import
  local r=$1 first=${1%%/*}
  if [ "$r" = "$first" ]; then r=docker.io/library/$r
  elif ! { [[ $first == *.* ]] || [[ $first == *:* ]] || [ "$first" = localhost ]; }; then r=docker.io/$r
  fi
  [[ ${r##*/} == *:* ]] || r=$r:latest
  echo "$r"
}

build_image() { # build_image CONTEXT REF -> builds unless an image built from this exact context exists
  local ctx=$1 ref=$2 hash have t0 from_base=
  [ -f "$ctx/Dockerfile" ] || die "$ctx/Dockerfile not found"
  if grep -Eqi "^[[:space:]]*FROM[[:space:]]+$BASE_IMAGE([[:space:]]|$)" "$ctx/Dockerfile"; then
    ensure_base_image
    from_base=$("$DOCKER" image inspect -f '{{ .Id }}' "$BASE_IMAGE")
  fi
  # Same context and same base image -> same image: skip the build (and the import after it).
  hash=$(printf '%s %s' "$(context_hash "$ctx")" "$from_base" | sha256sum | cut -c1-32)
  have=$("$DOCKER" image inspect -f '{{ index .Config.Labels "io.tpconf.context" }}' "$ref" 2>/dev/null || true)
  if [ "$have" = "$hash" ]; then
    log "$ref: up to date"
    return 0
  fi
  t0=$(now)
  "$DOCKER" build --network host --label "io.tpconf.context=$hash" -t "$ref" "$ctx" >"$STATE/build-${ref//[\/:]/_}.log" 2>&1 ||
    { tail -n 30 "$STATE/build-${ref//[\/:]/_}.log" >&2; die "build of $ref failed (log: $STATE/build-${ref//[\/:]/_}.log)"; }
  log "$ref: built in $(elapsed "$t0")s"
}

cluster_containerd_up() { sock_alive "$CLUSTER_CONTAINERD"; }

import_image() { # import_image REF -> into the cluster's containerd, unless that exact image is there
  local ref=$1 full id have t0
  full=$(normalize_ref "$ref")
  id=$("$DOCKER" image inspect -f '{{ .Id }}' "$ref")
  have=$(ctr -a "$CLUSTER_CONTAINERD" -n k8s.io images ls "name==$full" 2>/dev/null |
    awk 'NR > 1 { print $NF }' | tr ',' '\n' | sed -n 's/^io\.tpconf\.image-id=//p')
  if [ "$have" = "$id" ]; then
    log "$full: already in the cluster's containerd"
    return 0
  fi
  t0=$(now)
  # Twice at most: an import racing the kubelet's image garbage collection or a containerd
  # restart has been seen to end without error and without the image.
  local attempt
  for attempt in 1 2; do
    "$DOCKER" save "$ref" | ctr -a "$CLUSTER_CONTAINERD" -n k8s.io images import - >/dev/null
    ctr -a "$CLUSTER_CONTAINERD" -n k8s.io images ls -q | grep -qxF "$full" && break
    [ "$attempt" = 2 ] && die "$full is not in the cluster's containerd after the import"
    log "$full: not there after the import; importing again"
  done
  ctr -a "$CLUSTER_CONTAINERD" -n k8s.io images label "$full" "io.tpconf.image-id=$id" >/dev/null
  log "$full: imported in $(elapsed "$t0")s"
}
