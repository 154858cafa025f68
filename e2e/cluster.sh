#!/usr/bin/env bash
# e2e/cluster.sh — a real single-node Kubernetes (v1.20, built from Debian's `kubernetes` source
# package) with containerd + runc + the reference CNI plugins, all inside a private network
# namespace `kube`, reachable from the host through TCP forwarders on 127.0.0.1.
# See e2e/README.md. Subcommands:
#
#   build                         packages + kube binaries (incl. kubectl), only what is missing
#   up                            start (idempotent; cleans and restarts a partial/stale cluster)
#   down                          stop everything up/forward started, unmount, delete netns + state
#   status                        exit 0 iff the cluster is up and healthy
#   kubeconfig                    print the host kubeconfig path
#   kubectl ARGS...               the cached kubectl with that kubeconfig
#   forward NAME HOST_PORT IP:PORT  expose an in-namespace address on host 127.0.0.1:HOST_PORT
#   registry                      print the in-cluster registry as the node pulls from it and as
#                                 the host pushes to it: "10.88.0.1:5000 127.0.0.1:15000"
#   push ARCHIVE REPO:TAG         push an OCI archive (see oci-image.py) to the in-cluster registry
#   registry-start NAME PORT      another registry (CNCF distribution) in the netns on 0.0.0.0:PORT,
#                                 forwarded from host 127.0.0.1:PORT: 127.0.0.1:PORT/... names one
#                                 image on both sides, as a registry on a node's loopback would
#   logs                          last lines of every component's log
#
# CNI: configuration in $KUBE_STATE/cni, plugins in $KUBE_STATE/cni-bin (Mesh.spec.cni for CNI mode).
# Images: every image, the pause image included, is pulled by the node from a registry (Debian's
#   docker-registry) that runs in the netns on $NODE_IP:5000; containerd reaches it over plain HTTP
#   (certs.d/<host>/hosts.toml). Nothing is imported into containerd behind the kubelet's back.
# Environment: KUBE_CACHE (/var/cache/local-kube), KUBE_STATE (/tmp/trellis-kube),
#   KUBE_API_PORT (16443), KUBE_REGISTRY_PORT (15000, the registry on the host), KUBE_WAIT_TIMEOUT (180), KUBECTL ($KUBE_CACHE/bin/kubectl),
#   KUBECONFIG (if set and reachable, that cluster is used instead of starting a local one).
#
# Traps (found by ../shared/lab/local-cluster.sh and here):
# - no CAP_SYS_RESOURCE: runc cannot lower oom_score_adj -> containerd restrict_oom_score_adj = true
# - the kernel has no `dummy` driver: an empty bridge carries the node IP
# - `ip netns exec` remounts /sys; use nsenter --net= instead
# - stop processes by namespace membership / recorded pid+starttime, never by name
# - socat splits EXEC:... parameters on ':'; the inner address must be written TCP\:ip\:port
# - host-local IPAM keeps leases in /var/lib/cni by default: its dataDir is moved under the state
#   dir, or repeated up/down cycles exhaust the pod subnet
# shellcheck disable=SC2015,SC2016,SC2012  # `A && B || die`, the literal sh -c script, ls of one source dir
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}

KUBE_CACHE=${KUBE_CACHE:-/var/cache/local-kube}
STATE=$(realpath -m "${KUBE_STATE:-/tmp/trellis-kube}")
API_PORT=${KUBE_API_PORT:-16443}
REGISTRY_HOST_PORT=${KUBE_REGISTRY_PORT:-15000}
WAIT=${KUBE_WAIT_TIMEOUT:-180}
BIN=$KUBE_CACHE/bin
KUBECTL=${KUBECTL:-$BIN/kubectl}
NS=kube
NSPATH=/var/run/netns/$NS
NODE_IP=10.88.0.1
REGISTRY=$NODE_IP:5000      # the in-cluster registry, as the node pulls from it
PAUSE_IMAGE=$REGISTRY/kube/pause:3.2
POD_CIDR=10.244.0.0/24
CNI_NET=trellis-podnet
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMPONENTS=(etcd registry apiserver kcm scheduler containerd kubelet kube-proxy)
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
PKGS=(golang-go dpkg-dev make gcc libc6-dev rsync etcd-server containerd runc containernetworking-plugins
      iptables iproute2 conntrack socat curl openssl ca-certificates python3 util-linux busybox-static
      golang-github-modern-go-reflect2-dev docker-registry skopeo)
# Bump when the way the kube binaries are built changes: cached binaries of another recipe are rebuilt.
BUILD_RECIPE="v1.20 reflect2-1.0.2"
CMDS=(etcd containerd containerd-shim-runc-v2 runc ctr socat nsenter setsid flock ip ss iptables conntrack
      curl openssl python3 ldd docker-registry skopeo)

case $STATE in /|/tmp|/var|/var/*/|/root|/home|"") echo "cluster.sh: refusing KUBE_STATE=$STATE" >&2; exit 2;; esac

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { printf 'cluster.sh: error: %s\n' "$*" >&2; exit 1; }

lock() { # serialize build/up/down/forward/image (the netns name is machine-global)
  exec 9>/run/lock/trellis-cluster.lock
  flock -w 900 9 || die "another cluster.sh is still running (lock /run/lock/trellis-cluster.lock)"
}

# ---------------------------------------------------------------- processes we own
# start time of a live process; fails for a zombie (this machine's init reaps orphans only after a while)
# shellcheck disable=SC2086  # word-splitting the stat line is the point
starttime() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; [ "$1" != Z ] && echo "${20}"; }
# shellcheck disable=SC2086
pgrp() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; echo "$3"; }

alive() { # PIDFILE: the recorded process still runs (same pid and start time, so not a reused pid)
  local pid st
  [ -s "$1" ] || return 1
  read -r pid st < "$1" || return 1
  [ -n "$pid" ] && [ -n "${st:-}" ] && [ "$(starttime "$pid" 2>/dev/null)" = "$st" ]
}

spawn() { # PIDFILE LOG ns|host CMD... : start detached in its own session; record "pid starttime"
  local pidf=$1 log=$2 where=$3 pid; shift 3
  local pre=(); [ "$where" = ns ] && pre=(nsenter "--net=$NSPATH")
  mkdir -p "$(dirname "$pidf")"; rm -f "$pidf" "$pidf.tmp"
  "${pre[@]}" setsid sh -c 'echo $$ > "$0"; exec "$@"' "$pidf.tmp" "$@" > "$log" 2>&1 < /dev/null 9>&- &   # 9 = our lock fd: must not leak
  for _ in $(seq 200); do [ -s "$pidf.tmp" ] && break; sleep 0.05; done
  [ -s "$pidf.tmp" ] || die "could not start $* (log: $log)"
  read -r pid < "$pidf.tmp"; rm -f "$pidf.tmp"
  echo "$pid $(starttime "$pid" || echo dead)" > "$pidf"
}

stop_pidfile() { # PIDFILE : stop the recorded process (and its process group if it leads one)
  local f=$1 pid st target
  if alive "$f"; then
    read -r pid st < "$f"
    target=$pid; [ "$(pgrp "$pid")" = "$pid" ] && target=-$pid
    kill -TERM -- "$target" 2>/dev/null || true
    for _ in $(seq 50); do alive "$f" || break; sleep 0.1; done
    alive "$f" && { kill -KILL -- "$target" 2>/dev/null || true; }
    for _ in $(seq 50); do alive "$f" || break; sleep 0.1; done
    alive "$f" && die "could not stop pid $pid ($f)"
  fi
  rm -f "$f"
}

wait_for() { # WHAT TIMEOUT LOG PIDNAME CMD... : poll CMD until it succeeds, bounded
  local what=$1 t=$2 log=$3 pname=$4; shift 4
  local deadline=$((SECONDS + t))
  until "$@" > /dev/null 2>&1; do
    if [ -n "$pname" ] && ! alive "$STATE/pids/$pname.pid"; then
      [ -f "$log" ] && tail -n 40 "$log" >&2
      die "$what: $pname exited (log: $log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      [ -f "$log" ] && tail -n 40 "$log" >&2
      die "timed out after ${t}s waiting for $what (log: $log)"
    fi
    sleep 0.5
  done
}

inns() { nsenter "--net=$NSPATH" "$@"; }
kin() { inns "$KUBECTL" --kubeconfig "$STATE/pki/admin.kubeconfig" --request-timeout=5s "$@"; }
khost() { "$KUBECTL" --kubeconfig "$STATE/kubeconfig" --request-timeout=5s "$@"; }
port_busy() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
http_ok() { curl -fsS --max-time 3 -o /dev/null "$@"; }

# ---------------------------------------------------------------- external cluster (KUBECONFIG)
external() { # KUBECONFIG names another cluster and it answers
  [ -n "${KUBECONFIG:-}" ] && [ "$KUBECONFIG" != "$STATE/kubeconfig" ] || return 1
  [ -x "$KUBECTL" ] || return 1
  "$KUBECTL" --request-timeout=5s get --raw /version > /dev/null 2>&1
}

# ---------------------------------------------------------------- build
ensure_deb_src() { # deb-src entries derived from the machine's own apt sources (no host named here)
  grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/debian-src.sources
  elif grep -qs '^deb ' /etc/apt/sources.list; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/debian-src.list
  else
    die "no apt source found to derive a deb-src entry from (need /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list)"
  fi
  apt-get update -qq > "$KUBE_CACHE/apt.log" 2>&1 || { tail -20 "$KUBE_CACHE/apt.log" >&2; die "apt-get update failed (log: $KUBE_CACHE/apt.log)"; }
}

build() {
  lock
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$KUBE_CACHE" "$BIN"
  local p missing=() need=() b c src
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing packages: ${missing[*]}"
    { dpkg --configure -a || true; apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } > "$KUBE_CACHE/apt.log" 2>&1 \
      || { tail -20 "$KUBE_CACHE/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $KUBE_CACHE/apt.log)"; }
  fi
  if [ "$(cat "$BIN/.recipe" 2> /dev/null)" != "$BUILD_RECIPE" ]; then
    need=("${KUBE_BINS[@]/#/cmd/}")
  else
    for b in "${KUBE_BINS[@]}"; do [ -x "$BIN/$b" ] || need+=("cmd/$b"); done
  fi
  if [ ${#need[@]} -gt 0 ]; then
    src=$(ls -d "$KUBE_CACHE"/src/kubernetes-*/ 2> /dev/null | head -1 || true)
    if [ -z "$src" ] || [ ! -f "$src/Makefile" ]; then
      ensure_deb_src
      say "fetching the kubernetes source package"
      rm -rf "$KUBE_CACHE/src"; mkdir -p "$KUBE_CACHE/src"
      (cd "$KUBE_CACHE/src" && apt-get source -qq kubernetes) > "$KUBE_CACHE/apt.log" 2>&1 \
        || { tail -20 "$KUBE_CACHE/apt.log" >&2; die "apt-get source kubernetes failed (log: $KUBE_CACHE/apt.log)"; }
      src=$(ls -d "$KUBE_CACHE"/src/kubernetes-*/ | head -1)
    fi
    say "building ${need[*]} (log: $KUBE_CACHE/build.log; ~6-15 min on 2 cores)"
    local t0=$SECONDS
    ( cd "$src"
      export GOPATH=$PWD/.go CGO_ENABLED=0 HOME=$KUBE_CACHE/home
      mkdir -p .go/src/k8s.io; [ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
      # Trap: Go >= 1.18 changed reflect.mapiterinit, and the vendored reflect2 1.0.1 makes the
      # apiserver segfault ("fatal error: fault" in mapiterinit) as soon as a custom resource is
      # written. Debian's reflect2 1.0.2 carries the upstream fix.
      rm -rf vendor/github.com/modern-go/reflect2
      mkdir -p vendor/github.com/modern-go/reflect2
      cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
         vendor/github.com/modern-go/reflect2/
      make WHAT="${need[*]}" GOLDFLAGS="-s -w"
      for c in "${need[@]}"; do cp "_output/local/bin/linux/amd64/${c#cmd/}" "$BIN/"; done
      echo "$BUILD_RECIPE" > "$BIN/.recipe"
    ) > "$KUBE_CACHE/build.log" 2>&1 || { tail -30 "$KUBE_CACHE/build.log" >&2; die "kubernetes build failed (log: $KUBE_CACHE/build.log)"; }
    say "built ${need[*]} in $((SECONDS - t0))s"
  fi
  if [ ! -x "$BIN/pause" ]; then
    src=$(ls -d "$KUBE_CACHE"/src/kubernetes-*/ 2> /dev/null | head -1 || true)
    [ -n "$src" ] && [ -f "$src/build/pause/linux/pause.c" ] || die "pause.c not found under $KUBE_CACHE/src (remove $KUBE_CACHE/src and re-run build)"
    gcc -static -O2 -o "$BIN/pause" "$src/build/pause/linux/pause.c" || die "building the static pause binary failed"
  fi
  check_built || exit 1
  say "build: ok ($BIN)"
}

check_built() { # quiet unless something is missing
  local b c m=()
  for b in "${KUBE_BINS[@]}" pause; do [ -x "$BIN/$b" ] || m+=("$BIN/$b"); done
  for c in "${CMDS[@]}"; do command -v "$c" > /dev/null || m+=("$c"); done
  for c in bridge host-local portmap loopback; do [ -x "/usr/lib/cni/$c" ] || m+=("/usr/lib/cni/$c"); done
  [ ${#m[@]} -eq 0 ] && return 0
  say "missing: ${m[*]}"; say "run: $HERE/cluster.sh build"; return 1
}

# ---------------------------------------------------------------- health
component_ok() { case $1 in registry) alive "$STATE/pids/registry-cluster.pid" ;; *) alive "$STATE/pids/$1.pid" ;; esac; }
node_ready() {
  [ "$(kin get node node1 -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2> /dev/null)" = True ]
}
inner_healthy() {
  [ -e "$NSPATH" ] && [ -x "$KUBECTL" ] || return 1
  local c; for c in "${COMPONENTS[@]}"; do component_ok "$c" || return 1; done
  kin get --raw /readyz > /dev/null 2>&1 && node_ready
}
forwarder_healthy() {
  alive "$STATE/forwards/apiserver.pid" && [ -s "$STATE/kubeconfig" ] && khost get --raw /readyz > /dev/null 2>&1 \
    && alive "$STATE/forwards/registry.pid" && http_ok "http://127.0.0.1:$REGISTRY_HOST_PORT/v2/"
}
healthy() { inner_healthy && forwarder_healthy; }

anything_ours() {
  [ -e "$STATE" ] || [ -n "$(our_netns)" ]
}

# ---------------------------------------------------------------- registries
start_registry() { # NAME PORT : CNCF distribution in the netns on 0.0.0.0:PORT, storage under the state dir
  local name=$1 port=$2 dir=$STATE/registry/$1
  mkdir -p "$dir/data"
  cat > "$dir/config.yml" << X
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $dir/data}
  delete: {enabled: true}
http: {addr: "0.0.0.0:$port"}
X
  spawn "$STATE/pids/registry-$name.pid" "$STATE/log/registry-$name.log" ns docker-registry serve "$dir/config.yml"
  wait_for "registry $name on port $port" 30 "$STATE/log/registry-$name.log" "registry-$name" \
    inns curl -fsS --max-time 3 "http://127.0.0.1:$port/v2/"
}

skopeo_push() { # ARCHIVE DEST_REF(docker://...) : the layers compressed, as a registry normally holds them
  skopeo --insecure-policy copy --quiet --dest-tls-verify=false --dest-compress "oci-archive:$1" "$2"
}

# ---------------------------------------------------------------- up
pki() {
  local D=$STATE/pki n
  mkdir -p "$D"; cd "$D"
  openssl genrsa -out ca.key 2048 2> /dev/null
  openssl req -x509 -new -key ca.key -subj "/CN=trellis-e2e-ca" -days 365 -out ca.crt
  printf '[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:%s\n' "$NODE_IP" > apiserver.cnf
  openssl genrsa -out apiserver.key 2048 2> /dev/null
  openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile apiserver.cnf -extensions ext -out apiserver.crt 2> /dev/null
  # X.509 v3 with explicit usages: rustls/webpki (kube-rs on the host) rejects v1 certificates.
  printf '[ext]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.cnf
  client() {
    openssl genrsa -out "$1.key" 2048 2> /dev/null; openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile client.cnf -extensions ext -out "$1.crt" 2> /dev/null
  }
  client admin "/O=system:masters/CN=admin"; client kubelet "/O=system:nodes/CN=system:node:node1"
  client kcm "/CN=system:kube-controller-manager"; client sched "/CN=system:kube-scheduler"; client proxy "/CN=system:kube-proxy"
  openssl genrsa -out sa.key 2048 2> /dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2> /dev/null
  for n in admin kubelet kcm sched proxy; do
    cat > "$n.kubeconfig" << Y
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://$NODE_IP:6443", certificate-authority: $D/ca.crt}}]
users: [{name: u, user: {client-certificate: $D/$n.crt, client-key: $D/$n.key}}]
contexts: [{name: c, context: {cluster: local, user: u}}]
current-context: c
Y
  done
  cd - > /dev/null
}

write_host_kubeconfig() { # self-contained (embedded credentials), for use from the host
  local D=$STATE/pki
  cat > "$STATE/kubeconfig.tmp" << Y
apiVersion: v1
kind: Config
clusters:
- name: trellis-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 < "$D/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 < "$D/admin.crt")
    client-key-data: $(base64 -w0 < "$D/admin.key")
contexts:
- name: trellis-e2e
  context: {cluster: trellis-e2e, user: admin, namespace: default}
current-context: trellis-e2e
Y
  chmod 600 "$STATE/kubeconfig.tmp"; mv "$STATE/kubeconfig.tmp" "$STATE/kubeconfig"
}

start_forward() { # NAME HOST_PORT TARGET_IP:PORT — host 127.0.0.1:HOST_PORT -> TARGET inside netns kube
  local name=$1 port=$2 target=$3 f=$STATE/forwards/$1
  mkdir -p "$STATE/forwards"
  if alive "$f.pid" && [ "$(cat "$f.spec" 2> /dev/null)" = "$port $target" ] && port_busy "$port"; then return 0; fi
  stop_pidfile "$f.pid"   # also one that is still alive but no longer listening (e.g. exiting after a TERM)
  port_busy "$port" && die "127.0.0.1:$port is already in use by a process not started by cluster.sh"
  # each accepted connection runs `socat STDIO TCP:target` inside the netns (socat 1.7 has no netns option);
  # ':' inside the EXEC command must be escaped, socat otherwise splits the address parameters on it
  spawn "$f.pid" "$STATE/log/forward-$name.log" host \
    socat TCP-LISTEN:"$port",bind=127.0.0.1,fork,reuseaddr \
    "EXEC:nsenter --net=$NSPATH socat STDIO TCP\\:${target%:*}\\:${target##*:}"
  echo "$port $target" > "$f.spec"
  local deadline=$((SECONDS + 10))
  until port_busy "$port"; do
    alive "$f.pid" || { cat "$STATE/log/forward-$name.log" >&2; die "forwarder $name exited (log: $STATE/log/forward-$name.log)"; }
    [ $SECONDS -lt $deadline ] || die "timed out waiting for forwarder $name on 127.0.0.1:$port (log: $STATE/log/forward-$name.log)"
    sleep 0.1
  done
}

start_api_forwarder() {
  start_forward apiserver "$API_PORT" "$NODE_IP:6443"
  write_host_kubeconfig
  wait_for "the API server through the host forwarder 127.0.0.1:$API_PORT" 30 "$STATE/log/forward-apiserver.log" "" \
    khost get --raw /readyz
}

up() {
  if external; then say "using the existing cluster from KUBECONFIG=$KUBECONFIG (not starting a local one)"; return 0; fi
  lock
  check_built || die "prerequisites missing"
  local t0=$SECONDS
  if inner_healthy; then
    if forwarder_healthy; then say "cluster already up and healthy (kubeconfig: $STATE/kubeconfig)"; return 0; fi
    say "cluster healthy but the host forwarder is not; restarting it"
    start_api_forwarder; say "up: ok (kubeconfig: $STATE/kubeconfig)"; return 0
  fi
  if anything_ours; then say "partial or stale cluster state found; cleaning it first"; do_down > /dev/null; fi
  port_busy "$API_PORT" && die "127.0.0.1:$API_PORT is in use by another process (set KUBE_API_PORT)"
  port_busy "$REGISTRY_HOST_PORT" && die "127.0.0.1:$REGISTRY_HOST_PORT is in use by another process (set KUBE_REGISTRY_PORT)"

  local P=$STATE/pki L=$STATE/log
  mkdir -p "$L" "$STATE/cni" "$STATE/manifests" "$STATE/pids" "$STATE/forwards" "$STATE/img" "$STATE/containerd"
  say "starting the cluster (state: $STATE, logs: $L)"
  pki

  ip netns add "$NS"
  inns ip link set lo up
  inns ip link add node0 type bridge        # no `dummy` driver on this kernel; an empty bridge carries the node IP
  inns ip addr add "$NODE_IP/32" dev node0
  inns ip link set node0 up
  inns ip route add default dev node0
  inns sysctl -qw net.ipv4.ip_forward=1
  inns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2> /dev/null || true

  # The runtime's CNI bin dir lives in the state dir (links to Debian's reference plugins), so a
  # chained plugin installed by the mesh never lands in /usr/lib/cni and `down` removes it.
  mkdir -p "$STATE/cni-bin"
  ln -sf /usr/lib/cni/* "$STATE/cni-bin/"
  cat > "$STATE/cni/10-bridge.conflist" << X
{"cniVersion":"0.4.0","name":"$CNI_NET","plugins":[
 {"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"hairpinMode":true,
  "ipam":{"type":"host-local","dataDir":"$STATE/cni-ipam","ranges":[[{"subnet":"$POD_CIDR"}]],"routes":[{"dst":"0.0.0.0/0"}]}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
X
  # restrict_oom_score_adj: no CAP_SYS_RESOURCE here, runc cannot lower oom_score_adj (pods would fail with
  # "can't get final child's PID from pipe: EOF"). Every path containerd/runc write is kept under $STATE.
  cat > "$STATE/containerd/config.toml" << X
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$STATE/containerd/containerd.sock"
[ttrpc]
  address = "$STATE/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$STATE/containerd/certs.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$STATE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$STATE/cni-bin"
    conf_dir = "$STATE/cni"
X
  mkdir -p "$STATE/containerd/certs.d/$REGISTRY"
  printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$REGISTRY" "$REGISTRY" \
    > "$STATE/containerd/certs.d/$REGISTRY/hosts.toml"
  start_registry cluster "${REGISTRY##*:}"
  start_forward registry "$REGISTRY_HOST_PORT" "$REGISTRY"
  spawn "$STATE/pids/etcd.pid" "$L/etcd.log" ns etcd --name node1 --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster node1=http://127.0.0.1:2380
  spawn "$STATE/pids/containerd.pid" "$L/containerd.log" ns containerd --config "$STATE/containerd/config.toml"
  wait_for "etcd" 60 "$L/etcd.log" etcd inns curl -fsS --max-time 3 http://127.0.0.1:2379/health

  spawn "$STATE/pids/apiserver.pid" "$L/apiserver.log" ns "$BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --advertise-address="$NODE_IP" \
    --secure-port=6443 --service-cluster-ip-range=10.96.0.0/16 --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" --kubelet-client-certificate="$P/admin.crt" --kubelet-client-key="$P/admin.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --api-audiences=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount \
    --allow-privileged=true
  wait_for "containerd" 60 "$L/containerd.log" containerd ctr --address "$STATE/containerd/containerd.sock" version
  mkdir -p "$STATE/img"
  python3 "$HERE/oci-image.py" "$PAUSE_IMAGE" "$STATE/img/pause.tar" --entrypoint '["/pause"]' \
    --binary "$BIN/pause:/pause" > /dev/null || die "building the pause image failed"
  skopeo_push "$STATE/img/pause.tar" "docker://127.0.0.1:$REGISTRY_HOST_PORT/${PAUSE_IMAGE#*/}" \
    || die "pushing the pause image to the in-cluster registry failed"
  wait_for "kube-apiserver /readyz" 120 "$L/apiserver.log" apiserver kin get --raw /readyz

  spawn "$STATE/pids/kcm.pid" "$L/kcm.log" ns "$BIN/kube-controller-manager" --kubeconfig="$P/kcm.kubeconfig" \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" --use-service-account-credentials=true \
    --leader-elect=false --controllers='*,-nodeipam'
  spawn "$STATE/pids/scheduler.pid" "$L/scheduler.log" ns "$BIN/kube-scheduler" --kubeconfig="$P/sched.kubeconfig" --leader-elect=false

  cat > "$STATE/kubelet.yaml" << X
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication: {x509: {clientCAFile: $P/ca.crt}, webhook: {enabled: false}, anonymous: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: [10.96.0.10]
clusterDomain: cluster.local
podCIDR: $POD_CIDR
staticPodPath: $STATE/manifests
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
X
  spawn "$STATE/pids/kubelet.pid" "$L/kubelet.log" ns "$BIN/kubelet" --config="$STATE/kubelet.yaml" \
    --kubeconfig="$P/kubelet.kubeconfig" --container-runtime=remote \
    --container-runtime-endpoint="unix://$STATE/containerd/containerd.sock" --root-dir="$STATE/kubelet" \
    --hostname-override=node1 --node-ip="$NODE_IP" --cert-dir="$STATE/kubelet/pki"
  printf 'apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection: {kubeconfig: %s}\nmode: iptables\nclusterCIDR: 10.244.0.0/16\nconntrack: {maxPerCore: 0}\n' \
    "$P/proxy.kubeconfig" > "$STATE/kube-proxy.yaml"
  spawn "$STATE/pids/kube-proxy.pid" "$L/kube-proxy.log" ns "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml" --hostname-override=node1

  start_api_forwarder
  wait_for "kube-controller-manager /healthz" 60 "$L/kcm.log" kcm inns curl -fsS --max-time 3 http://127.0.0.1:10252/healthz
  wait_for "kube-scheduler /healthz" 60 "$L/scheduler.log" scheduler inns curl -fsS --max-time 3 http://127.0.0.1:10251/healthz
  wait_for "kubelet /healthz" 90 "$L/kubelet.log" kubelet inns curl -fsS --max-time 3 http://127.0.0.1:10248/healthz
  wait_for "kube-proxy /healthz" 90 "$L/kube-proxy.log" kube-proxy inns curl -fsS --max-time 3 http://127.0.0.1:10256/healthz
  wait_for "node node1 Ready" "$WAIT" "$L/kubelet.log" kubelet node_ready
  wait_for "ServiceAccount default/default" "$WAIT" "$L/kcm.log" kcm khost -n default get serviceaccount default
  wait_for "the service-account token controller (a token Secret for default/default)" "$WAIT" "$L/kcm.log" kcm \
    sa_has_token
  wait_for "the root-ca-cert-publisher (ConfigMap default/kube-root-ca.crt)" "$WAIT" "$L/kcm.log" kcm \
    khost -n default get configmap kube-root-ca.crt
  healthy || die "cluster came up but the health check fails (see: $HERE/cluster.sh logs)"
  say "up: ok in $((SECONDS - t0))s (kubeconfig: $STATE/kubeconfig; kubectl: $HERE/cluster.sh kubectl ...)"
}

sa_has_token() { [ -n "$(khost -n default get serviceaccount default -o 'jsonpath={.secrets[0].name}' 2> /dev/null)" ]; }

# ---------------------------------------------------------------- down
our_netns() { local n; for n in "$NSPATH" /var/run/netns/cni-*; do [ -e "$n" ] && echo "${n##*/}"; done; true; }
ns_pids() { local n; for n in $(our_netns); do ip netns pids "$n" 2> /dev/null || true; done | sort -un; }
state_mounts() { # mount points at or under $STATE, deepest first (mountinfo escapes spaces as \040)
  awk -v s="$STATE" '{ m = $5; gsub(/\\040/, " ", m); if (m == s || index(m, s "/") == 1) print m }' /proc/self/mountinfo | sort -ru
}
host_forwarders() { # socat listeners whose per-connection command enters our netns (for the final check only)
  local p; for p in $(pgrep -x socat 2> /dev/null || true); do
    tr '\0' ' ' < "/proc/$p/cmdline" 2> /dev/null | grep -q -- "--net=$NSPATH " && [ "$(readlink "/proc/$p/ns/net")" = "$(readlink /proc/1/ns/net)" ] && echo "$p"
  done; true
}

do_down() {
  local t0=$SECONDS f sig n m pids
  # 1. host-side forwarders, by recorded pid + start time (their process group holds the per-connection children)
  for f in "$STATE"/forwards/*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  # 2. everything in netns kube and the pod netns cni-*, by membership (never by name); kubelet and
  #    containerd first so nothing gets restarted while we stop the rest
  for f in kubelet containerd; do [ -e "$STATE/pids/$f.pid" ] && alive "$STATE/pids/$f.pid" && { read -r n _ < "$STATE/pids/$f.pid"; kill -TERM "$n" 2> /dev/null || true; }; done
  # (state is discarded, so no long grace period; container init processes ignore TERM anyway)
  for sig in TERM KILL; do
    pids=$(ns_pids)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086  # a list of pids
    kill "-$sig" $pids 2> /dev/null || true
    for _ in $(seq 50); do [ -z "$(ns_pids)" ] && break; sleep 0.1; done
  done
  [ -z "$(ns_pids)" ] || say "warning: processes still in our network namespaces: $(ns_pids | tr '\n' ' ')"
  # 3. every mount under the state dir (pod volumes, shm, rootfs, overlay snapshots, tmpfs)
  for _ in 1 2 3 4 5; do
    m=$(state_mounts); [ -z "$m" ] && break
    while IFS= read -r n; do umount "$n" 2> /dev/null || umount -l "$n" 2> /dev/null || true; done <<< "$m"
  done
  # 4. network namespaces
  for n in $(our_netns); do ip netns del "$n" 2> /dev/null || { umount -l "/var/run/netns/$n" 2> /dev/null; rm -f "/var/run/netns/$n"; } || true; done
  # 5. CNI result cache for our network, empty leftover pod cgroups of our kubelet
  rm -f /var/lib/cni/results/"$CNI_NET"-* /var/lib/cni/results/cni-loopback-* 2> /dev/null || true
  for n in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$n" ] && find "$n" -depth -type d -exec rmdir {} + 2> /dev/null || true
  done
  # 6. pod logs (the 1.20 kubelet writes them to /var/log/pods, /var/log/containers): only our pods' UIDs
  if [ -d "$STATE/kubelet/pods" ]; then
    for n in "$STATE"/kubelet/pods/*/; do
      n=${n%/}; n=${n##*/}; [ -n "$n" ] && [ "$n" != "*" ] && rm -rf /var/log/pods/*_"$n"
    done
    for n in /var/log/containers/*.log; do
      [ -L "$n" ] && [ ! -e "$n" ] && [[ $(readlink "$n") == /var/log/pods/* ]] && rm -f "$n"
    done
  fi
  # 7. the state dir (only when nothing is mounted below it any more)
  if [ -e "$STATE" ]; then
    [ -z "$(state_mounts)" ] || die "mounts remain under $STATE: $(state_mounts | tr '\n' ' ')"
    rm -rf --one-file-system "$STATE"
  fi
  echo "down: done in $((SECONDS - t0))s"
}

down_check() {
  local bad=0 p n m s
  p=$(ns_pids | tr '\n' ' '); n=$(our_netns | tr '\n' ' '); m=$(state_mounts | tr '\n' ' '); s=$(host_forwarders | tr '\n' ' ')
  echo "check: processes in netns kube/cni-*: ${p:-none}"; [ -z "$p" ] || bad=1
  echo "check: network namespaces kube/cni-*:  ${n:-none}"; [ -z "$n" ] || bad=1
  echo "check: mounts under $STATE: ${m:-none}"; [ -z "$m" ] || bad=1
  echo "check: host forwarders into netns $NS:  ${s:-none}"; [ -z "$s" ] || bad=1
  if [ -e "$STATE" ]; then echo "check: state dir $STATE: still present"; bad=1; else echo "check: state dir $STATE: removed"; fi
  [ $bad -eq 0 ] && echo "check: clean" || { echo "check: NOT clean" >&2; return 1; }
}

down() { lock; do_down; down_check; }

# ---------------------------------------------------------------- the rest
forward() {
  [ $# -eq 3 ] || die "usage: cluster.sh forward NAME HOST_PORT TARGET_IP:PORT"
  local name=$1 port=$2 target=$3
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "bad forward name: $name"
  [ "$name" != apiserver ] || die "the name 'apiserver' is reserved"
  [[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "bad host port: $port"
  [[ $target =~ ^[0-9]+(\.[0-9]+){3}:[0-9]+$ ]] || die "bad target (want IP:PORT): $target"
  lock
  [ -e "$NSPATH" ] && [ -d "$STATE" ] || die "the local cluster is not up (run: $HERE/cluster.sh up)"
  local f=$STATE/forwards/$name
  if alive "$f.pid" && [ "$(cat "$f.spec" 2> /dev/null)" = "$port $target" ] && port_busy "$port"; then
    say "forward $name already active: 127.0.0.1:$port -> $target (netns $NS)"; return 0
  fi
  local other
  for other in "$STATE"/forwards/*.spec; do
    [ -e "$other" ] && [ "$other" != "$f.spec" ] && [ "$(cut -d' ' -f1 "$other")" = "$port" ] && alive "${other%.spec}.pid" \
      && die "host port $port is already used by forward $(basename "${other%.spec}")"
  done
  start_forward "$name" "$port" "$target"
  say "forward $name: 127.0.0.1:$port -> $target (netns $NS)"
}

registry_cmd() { echo "$REGISTRY 127.0.0.1:$REGISTRY_HOST_PORT"; }

push() { # ARCHIVE REPO:TAG — to the in-cluster registry, through the host forwarder
  [ $# -eq 2 ] || die "usage: cluster.sh push ARCHIVE REPO:TAG"
  local archive=$1 ref=$2
  [[ $ref =~ ^[a-z0-9]+([._/-][a-z0-9]+)*:[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die "bad REPO:TAG (e.g. trellis/proxy:0.1.0): $ref"
  [ -f "$archive" ] || die "no such archive: $archive"
  http_ok "http://127.0.0.1:$REGISTRY_HOST_PORT/v2/" || die "the in-cluster registry is not reachable on 127.0.0.1:$REGISTRY_HOST_PORT (run: $HERE/cluster.sh up)"
  skopeo_push "$archive" "docker://127.0.0.1:$REGISTRY_HOST_PORT/$ref" || die "pushing $archive as $ref failed"
  # The node caches a tag it pulled: a tag pushed again with new content (a rebuild of the same
  # version) would keep running the old image. Forgetting the node's copy makes the next pod pull.
  local sock=$STATE/containerd/containerd.sock have="" want
  if [ -S "$sock" ]; then
    have=$(ctr --address "$sock" -n k8s.io images ls "name==$REGISTRY/$ref" 2> /dev/null | awk 'NR == 2 { print $3 }') || have=""
  fi
  if [ -n "$have" ]; then
    want=$(curl -fsS --max-time 10 -o /dev/null -D - -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "http://127.0.0.1:$REGISTRY_HOST_PORT/v2/${ref%:*}/manifests/${ref##*:}" | tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }')
    if [ -n "$want" ] && [ "$have" != "$want" ]; then
      ctr --address "$sock" -n k8s.io images rm "$REGISTRY/$ref" > /dev/null || die "could not drop the node's stale copy of $REGISTRY/$ref"
      say "pushed $ref ($want); the node's older copy ($have) is dropped"
      return 0
    fi
  fi
  say "pushed $REGISTRY/$ref"
}

registry_start() { # NAME PORT
  [ $# -eq 2 ] || die "usage: cluster.sh registry-start NAME PORT"
  local name=$1 port=$2
  [[ $name =~ ^[a-z0-9][a-z0-9-]*$ ]] && [ "$name" != cluster ] || die "bad registry name: $name"
  [[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65535 ] && [ "$port" != 5000 ] || die "bad port: $port"
  lock
  [ -e "$NSPATH" ] && [ -d "$STATE" ] || die "the local cluster is not up (run: $HERE/cluster.sh up)"
  if ! alive "$STATE/pids/registry-$name.pid"; then start_registry "$name" "$port"; fi
  start_forward "registry-$name" "$port" "$NODE_IP:$port"
  say "registry $name: 127.0.0.1:$port (host and node)"
}

kubeconfig() {
  if external; then echo "$KUBECONFIG"; return 0; fi
  [ -s "$STATE/kubeconfig" ] || die "the local cluster is not up (run: $HERE/cluster.sh up)"
  echo "$STATE/kubeconfig"
}

kubectl_cmd() {
  [ -x "$KUBECTL" ] || die "$KUBECTL missing (run: $HERE/cluster.sh build)"
  if external; then exec "$KUBECTL" "$@"; fi
  [ -s "$STATE/kubeconfig" ] || die "the local cluster is not up (run: $HERE/cluster.sh up)"
  exec "$KUBECTL" --kubeconfig "$STATE/kubeconfig" "$@"
}

status() {
  if external; then echo "external cluster reachable (KUBECONFIG=$KUBECONFIG)"; return 0; fi
  if healthy; then echo "up and healthy (kubeconfig: $STATE/kubeconfig)"; return 0; fi
  echo "not up (or unhealthy)"; return 1
}

logs() {
  local c n=${LOG_LINES:-60} f
  for c in etcd registry-cluster apiserver kcm scheduler containerd kubelet kube-proxy; do
    echo "===== $c ($STATE/log/$c.log) ====="
    tail -n "$n" "$STATE/log/$c.log" 2> /dev/null || echo "(no log)"
  done
  for f in "$STATE"/log/forward-*.log; do
    [ -s "$f" ] && { echo "===== $(basename "$f" .log) ($f) ====="; tail -n "$n" "$f"; }
  done
  true
}

usage() { sed -n '2,/^# Traps/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

cmd=${1:-}; [ $# -gt 0 ] && shift
case $cmd in
  build) build ;;
  up) up ;;
  down) down ;;
  status) status ;;
  kubeconfig) kubeconfig ;;
  kubectl) kubectl_cmd "$@" ;;
  forward) forward "$@" ;;
  registry) registry_cmd ;;
  push) push "$@" ;;
  registry-start) registry_start "$@" ;;
  logs) logs ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
