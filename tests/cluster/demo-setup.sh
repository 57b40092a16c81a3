#!/usr/bin/env bash
# The Telepresence docs' seed scenario in the local cluster: Deployment and Service `helloworld`
# (nginx on port 80) in the default namespace. Idempotent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
k() { "$BIN/kubectl" "$@"; }
if ! k -n default get deployment helloworld >/dev/null 2>&1; then
  k -n default create deployment helloworld --image=tpconf.local/nginx:1 >/dev/null
fi
if ! k -n default get service helloworld >/dev/null 2>&1; then
  k -n default expose deployment helloworld --port=80 >/dev/null
fi
k -n default rollout status deployment/helloworld --timeout=120s >/dev/null
echo "helloworld is running in namespace default"
