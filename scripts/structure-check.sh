#!/usr/bin/env bash
# Structure rules `make lint` enforces beyond rustc and clippy:
# - no import cycle between the modules of a product crate (scripts/module-cycles.py);
# - the data-plane binaries link no Kubernetes client or API types: the proxy, the init container
#   and the config model they share depend on trellis-config, never on trellis-api or kube.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/module-cycles.py config/src api/src operator/src proxy/src init/src cni/src cli/src \
  e2e/src e2e/apps/src
for pkg in trellis-config trellis-proxy trellis-init; do
  linked=$(cargo tree -q -p "$pkg" -e normal,build --prefix none | sed 's/ .*//' \
    | grep -E '^(kube|kube-[a-z-]+|k8s-openapi|trellis-api)$' | sort -u || true)
  if [ -n "$linked" ]; then
    echo "structure: $pkg must not depend on Kubernetes crates, but links:" $linked >&2
    exit 1
  fi
done
echo "structure: trellis-config, trellis-proxy and trellis-init link no Kubernetes crate"
