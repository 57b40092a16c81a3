#!/usr/bin/env bash
# Start the local single-node Kubernetes (idempotent): containerd, etcd, the control plane, a
# kubelet, kube-proxy and CoreDNS, as local processes the way hack/local-up-cluster.sh runs them.
# Ends when the node is Ready and cluster DNS answers; prints the KUBECONFIG export line.
#
# Run again, it heals: a component that stopped is started again, and only that one (a process is
# alive when the pid *and* start time of its pid file match, lib.sh `alive`); a config file is
# rewritten only when its content changes, and then the component that reads it is restarted;
# "already running" means every component runs, the API server is ready, the node is Ready and
# cluster DNS answers.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$PKI" "$RUN" "$LOGS" "$STATE/etcd" /etc/cni/net.d /etc/kubernetes/manifests
t0=$(date +%s.%N)
NODE_IP=$(node_ip)

[ "${1:-}" = containerd ] || for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd coredns; do
  [ -x "$BIN/$b" ] || { log "missing $BIN/$b: run tests/cluster/build.sh first"; exit 1; }
done

all_alive() {
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
}

if [ "${1:-}" != containerd ] && [ -f "$KUBECONFIG_ADMIN" ] && all_alive \
   && kc get --raw /readyz >/dev/null 2>&1 \
   && kc wait --for=condition=Ready "node/$NODE" --timeout=2s >/dev/null 2>&1 \
   && dns_answers >/dev/null 2>&1; then
  log "already running"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
  exit 0
fi

host_prep() {
  sysctl -qw fs.inotify.max_user_instances=8192 fs.inotify.max_user_watches=524288 \
    net.ipv4.ip_forward=1 || true
  # Bidirectional mount propagation for volumes and subpaths needs a shared root (kind does this).
  mount --make-rshared /
  # A Docker engine started for image builds sets FORWARD to DROP; bridged pod traffic crosses it.
  iptables -P FORWARD ACCEPT
}

write_containerd_config() {
  if write_if_changed "$STATE/containerd.toml" <<TOML
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # These VMs withhold CAP_SYS_RESOURCE even from root, so runc cannot lower oom_score_adj to the
  # kubelet's -998 for sandboxes ("nsexec: failed to update /proc/self/oom_score_adj").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
TOML
  then alive containerd && restart_containerd=1; fi
  write_if_changed /etc/cni/net.d/10-tpconf.conflist <<JSON || true
{
  "cniVersion": "1.0.0",
  "name": "tpconf-net",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}, "externalSetMarkChain": "KUBE-MARK-MASQ"},
    {"type": "firewall"}
  ]
}
JSON
}

# kubeconfig NAME USER: a kubeconfig with the embedded client cert of USER's key pair
kubeconfig() {
  local name=$1
  write_if_changed "$PKI/$name.kubeconfig" 600 <<YAML || true
apiVersion: v1
kind: Config
clusters:
- name: tpconf-local
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$name.crt")
    client-key-data: $(base64 -w0 < "$PKI/$name.key")
contexts:
- name: tpconf-local
  context: {cluster: tpconf-local, user: $name, namespace: default}
current-context: tpconf-local
YAML
}

# leaf NAME CN O USAGE [SANS]: a key pair signed by the cluster CA
leaf() {
  local name=$1 cn=$2 org=$3 usage=$4 sans=${5:-}
  [ -f "$PKI/$name.crt" ] && return 0
  openssl req -new -nodes -newkey rsa:2048 -keyout "$PKI/$name.key" -out "$PKI/$name.csr" \
    -subj "/CN=$cn${org:+/O=$org}" 2>/dev/null
  { echo "extendedKeyUsage=$usage"; [ -n "$sans" ] && echo "subjectAltName=$sans"; } > "$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}

certs() {
  # Certificates name the node's address: a new address (another machine) means new certificates.
  if [ -f "$PKI/node-ip" ] && [ "$(cat "$PKI/node-ip")" != "$NODE_IP" ]; then rm -f "$PKI"/*; fi
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl req -x509 -sha256 -nodes -days 3650 -newkey rsa:2048 -keyout "$PKI/ca.key" \
      -out "$PKI/ca.crt" -subj /CN=tpconf-local-ca 2>/dev/null
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  fi
  leaf apiserver kube-apiserver "" serverAuth \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost,DNS:$NODE,IP:127.0.0.1,IP:$FIRST_SERVICE_IP,IP:$NODE_IP"
  leaf apiserver-kubelet-client kube-apiserver "" clientAuth
  leaf admin admin system:masters clientAuth
  leaf controller system:kube-controller-manager "" clientAuth
  leaf scheduler system:kube-scheduler "" clientAuth
  leaf kube-proxy system:kube-proxy "" clientAuth
  leaf kubelet "system:node:$NODE" system:nodes clientAuth
  leaf kubelet-serving "system:node:$NODE" system:nodes serverAuth "DNS:$NODE,IP:$NODE_IP,IP:127.0.0.1"
  for u in admin controller scheduler kube-proxy kubelet; do kubeconfig "$u"; done
  write_if_changed "$KUBECONFIG_ADMIN" 600 < "$PKI/admin.kubeconfig" || true
  write_if_changed "$PKI/node-ip" <<< "$NODE_IP" || true
}

start_containerd() {
  if [ -n "${restart_containerd:-}" ]; then stop containerd; fi
  start containerd containerd --config "$STATE/containerd.toml"
  wait_for "containerd" 30 ctr -a "$CONTAINERD_SOCK" version
}

start_etcd() {
  start etcd "$BIN/etcd" --name tpconf --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --log-level warn --unsafe-no-fsync
  wait_for "etcd" 30 "$BIN/etcdctl" --endpoints http://127.0.0.1:2379 endpoint health
}

start_apiserver() {
  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$NODE_IP" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$PKI/sa.key" --service-account-signing-key-file="$PKI/sa.key" \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,Priority,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,NodeRestriction,PodSecurity \
    --storage-media-type=application/vnd.kubernetes.protobuf --cert-dir="$PKI/generated" --v=1
  wait_for "kube-apiserver /readyz" 90 kc get --raw /readyz
  # The API server calls kubelets (logs, exec, port-forward) as user kube-apiserver.
  kc create clusterrolebinding kube-apiserver-kubelet-admin --clusterrole=system:kubelet-api-admin \
    --user=kube-apiserver >/dev/null 2>&1 || true
}

start_controllers() {
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$PKI/controller.kubeconfig" \
    --authentication-kubeconfig="$PKI/controller.kubeconfig" \
    --authorization-kubeconfig="$PKI/controller.kubeconfig" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --use-service-account-credentials=true \
    --controllers='*' --leader-elect=false --bind-address=127.0.0.1 --v=1
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --v=1
}

start_kubelet() {
  if write_if_changed "$STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /
failSwapOn: false
address: 0.0.0.0
port: 10250
readOnlyPort: 0
staticPodPath: /etc/kubernetes/manifests
clusterDNS: [$DNS_SERVICE_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: /etc/resolv.conf
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1Gi", imagefs.available: "1Gi", nodefs.inodesFree: "1%"}
protectKernelDefaults: false
allowedUnsafeSysctls: []
YAML
  then stop kubelet; fi
  start kubelet "$BIN/kubelet" --config="$STATE/kubelet.yaml" \
    --kubeconfig="$PKI/kubelet.kubeconfig" --hostname-override="$NODE" --node-ip="$NODE_IP" \
    --pod-infra-container-image="$PAUSE_IMAGE" --v=1
  wait_for "node $NODE to register" 60 kc get "node/$NODE"
  kc wait --for=condition=Ready "node/$NODE" --timeout=90s >/dev/null
}

start_kube_proxy() {
  # kube-proxy exits by itself when its config file changes: written only if it does, and then
  # kube-proxy is started again here rather than left to exit.
  if write_if_changed "$STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.kubeconfig}
hostnameOverride: $NODE
mode: iptables
clusterCIDR: $POD_CIDR
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  then stop kube-proxy; fi
  start kube-proxy "$BIN/kube-proxy" --config="$STATE/kube-proxy.yaml" --v=1
  wait_for "kube-proxy /healthz" 30 curl -sf http://127.0.0.1:10256/healthz
}

start_dns() {
  sed -e "s#__DNS_SERVICE_IP__#$DNS_SERVICE_IP#g" -e "s#__COREDNS_VERSION__#$COREDNS_VERSION#g" \
    -e "s#__CLUSTER_DOMAIN__#$CLUSTER_DOMAIN#g" "$here/manifests/coredns.yaml" | kc apply -f - >/dev/null
  kc -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null
  # Answering means: a Service VIP through kube-proxy, the pod network, and CoreDNS all work.
  wait_for "cluster DNS to answer" 60 dns_answers
}

host_prep
write_containerd_config
certs
start_containerd
# `up.sh containerd` stops here: image builds need only the runtime.
[ "${1:-}" = containerd ] && exit 0
"$here/images.sh"
start_etcd
start_apiserver
start_controllers
start_kubelet
start_kube_proxy
start_dns
log "ready in $(python3 -c "import time;print(round(time.time()-$t0,1))") s"
echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
