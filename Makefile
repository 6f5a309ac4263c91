# tether: see README.md. Targets that load BPF or touch cgroups need root: `sudo make test`.

GO        ?= go
BPF_CLANG ?= clang-14
BPF_STRIP ?= llvm-strip-14
BPF_CFLAGS ?= -O2 -g -Wall -Werror
BIN       := bin
# Big builds (SPIRE, the Kubernetes binaries, test-vm's kernel) are cached outside the clone, under
# a hash of what they are built from: a fresh clone reuses them, a change to tools/spire or
# tools/k8s builds anew.
TETHER_CACHE ?= $(HOME)/.cache/tether
tools_hash = $(shell cat $(1)/go.mod $(1)/go.sum | sha256sum | cut -c1-12)

.PHONY: all build generate check-generate test test-faults test-unit test-vm test-k8s k8s-bin manifests policy-test bench vet fuzz demo clean spire spire-bin install

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/tetherd ./cmd/tetherctl

# Regenerate the bpf2go objects (pkg/kernel/tether_bpfel.{go,o}) from bpf/. They are committed, so
# building needs no clang; this needs clang-14 and llvm (apt-get install clang-14 llvm-14).
generate:
	@command -v $(BPF_CLANG) >/dev/null || { echo "$(BPF_CLANG) not found: apt-get install clang-14 llvm-14"; exit 1; }
	cd pkg/kernel && BPF_CLANG=$(BPF_CLANG) BPF_STRIP=$(BPF_STRIP) BPF_CFLAGS="$(BPF_CFLAGS)" $(GO) generate ./...

# Fail when the committed objects differ from what bpf/ compiles to.
check-generate: generate
	@git diff --exit-code --stat -- pkg/kernel/tether_bpfel.go pkg/kernel/tether_bpfel.o || { echo "generated BPF objects are stale: run make generate and commit"; exit 1; }

# The whole suite. As root it loads the real programs into the running kernel; with
# TETHER_REQUIRE_PRIVILEGED=1 a privileged test that cannot run fails instead of skipping. The
# end-to-end suite runs a real SPIRE server and agent (make spire builds them first).
test: spire
	$(GO) test -count=1 ./...
	cd test/k8s && $(GO) test -count=1 -skip 'TestAPIServerDryRun|TestNode' ./...

# SPIRE server and agent for the end-to-end tests, from tools/spire (a module of its own, so
# SPIRE's dependencies stay out of tether's go.mod). About 9 minutes the first time (cgo, for
# SPIRE's sqlite datastore); cached in TETHER_CACHE, linked from .bin/ (where the tests look
# without TETHER_SPIRE_BIN).
SPIRE_BIN := $(TETHER_CACHE)/spire-$(call tools_hash,tools/spire)
export TETHER_SPIRE_BIN ?= $(SPIRE_BIN)
spire: spire-bin
	@mkdir -p .bin && ln -sf $(SPIRE_BIN)/spire-server $(SPIRE_BIN)/spire-agent .bin/

spire-bin: $(SPIRE_BIN)/spire-agent

# Long builds say what they do and how long each step took (STEP prints "== [elapsed] what").
STEP = echo "== [$$(( $$(date +%s) - $$start ))s]"

$(SPIRE_BIN)/spire-agent:
	@start=$$(date +%s); \
	$(STEP) "spire: SPIRE's modules from the module proxy (tools/spire; the first time only)"; \
	(cd tools/spire && $(GO) mod download) && \
	$(STEP) "spire: building spire-server and spire-agent (cgo, sqlite: about 9 minutes cold, seconds with Go's build cache)" && \
	rm -rf $(SPIRE_BIN).tmp && mkdir -p $(SPIRE_BIN).tmp && \
	(cd tools/spire && $(GO) build -trimpath -ldflags="-s -w" -o $(SPIRE_BIN).tmp/ github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent) && \
	rm -rf $(SPIRE_BIN) && mv $(SPIRE_BIN).tmp $(SPIRE_BIN) && \
	$(STEP) "spire: done, in $(SPIRE_BIN)"

# The fault suite: tetherd stopped past expiries, killed in the middle of a change, its disk full,
# SPIRE and the bundle server down or flapping, maps full, every refused configuration kind. Each
# case says what must hold and what it measured (wrongly allowed connects, records unaccounted:
# both must be 0); the table is printed at the end. The cases are TestFault* in pkg/kernel and
# test/e2e, which skip outside this target. About 6 minutes; needs root and the SPIRE binaries.
FAULT_TABLE := $(BIN)/faults.md
test-faults: spire
	@mkdir -p $(BIN) && rm -f $(FAULT_TABLE)
	TETHER_FAULTS=1 TETHER_FAULT_TABLE=$(CURDIR)/$(FAULT_TABLE) $(GO) test -count=1 -timeout 30m -run '^TestFault' ./pkg/kernel ./test/e2e
	@printf '\n| case | must hold | measured | wrongly allowed | records unaccounted |\n|---|---|---|---|---|\n' && cat $(FAULT_TABLE)

# Only what needs no privileges (privileged tests skip with the reason).
test-unit:
	$(GO) test -count=1 -short ./...
	cd test/k8s && $(GO) test -count=1 -skip 'TestAPIServerDryRun|TestNode' ./...

# Kubernetes for real (test/k8s): `kubectl apply --dry-run=server` of deploy/kubernetes/ and of
# the chart in each value set against etcd and kube-apiserver on loopback (TestAPIServerDryRun);
# then a single-node cluster from real parts (TestNode: etcd, the control plane, the kubelet,
# containerd, runc and the CNI bridge, with the test's own cgroups, bridge and data directories)
# where the chart is installed with the Helm SDK and agent pods are checked from inside. Needs
# root and apt-get install containerd runc containernetworking-plugins. The Kubernetes binaries
# come from tools/k8s (13.5 minutes to build with an empty Go build cache on 2 cores) and are
# cached in TETHER_CACHE. With them cached, the target takes about 1.5 minutes.
K8S_VERSION := v1.37.2
# The binaries say which version they are (the chart's kubeVersion is checked against it).
K8S_LDFLAGS := -s -w $(foreach p,k8s.io/component-base/version k8s.io/client-go/pkg/version,-X $(p).gitVersion=$(K8S_VERSION) \
	-X $(p).gitMajor=1 -X $(p).gitMinor=37 -X $(p).gitTreeState=clean)
K8S_BIN := $(TETHER_CACHE)/k8s-$(K8S_VERSION)-$(shell (cat tools/k8s/go.mod tools/k8s/go.sum; echo '$(K8S_LDFLAGS)') | sha256sum | cut -c1-12)
test-k8s: k8s-bin
	cd test/k8s && TETHER_K8S_BIN=$(K8S_BIN) TETHER_REQUIRE_K8S=1 $(GO) test -count=1 -timeout 20m -run 'TestAPIServerDryRun|TestNode' -v ./...

k8s-bin: $(K8S_BIN)/etcd

$(K8S_BIN)/etcd:
	@start=$$(date +%s); \
	$(STEP) "k8s-bin: Kubernetes' and etcd's modules from the module proxy (tools/k8s; the first time only)"; \
	(cd tools/k8s && $(GO) mod download) && \
	$(STEP) "k8s-bin: building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl (about 12 minutes cold)" && \
	rm -rf $(K8S_BIN).tmp && mkdir -p $(K8S_BIN).tmp && \
	(cd tools/k8s && $(GO) build -trimpath -ldflags="$(K8S_LDFLAGS)" -o $(K8S_BIN).tmp/ k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl) && \
	$(STEP) "k8s-bin: building etcd (about 1 minute cold)" && \
	(cd tools/k8s && $(GO) build -trimpath -ldflags="-s -w" -o $(K8S_BIN).tmp/etcd go.etcd.io/etcd/server/v3) && \
	rm -rf $(K8S_BIN) && mv $(K8S_BIN).tmp $(K8S_BIN) && \
	$(STEP) "k8s-bin: done, in $(K8S_BIN)"

# deploy/kubernetes/ from the Helm chart (test/k8s checks they match).
manifests:
	cd test/k8s && $(GO) run ./cmd/manifests

# The shipped policy's Rego tests with the opa CLI (type-checked against the input schema).
# `go test ./pkg/policy` runs the same tests through OPA's Go tester.
policy-test:
	$(GO) tool opa test -v -s policies/input.schema.json policies/tether policies/data.json

# The privileged tests again inside a QEMU guest running Debian's stock kernel with BPF LSM on
# (the LSM exec and unix paths), and once with BPF LSM off (tether must notice and fall back).
# Needs root: apt-get install -y --no-install-recommends qemu-system-x86 cpio xz-utils.
test-vm:
	TETHER_VM_CACHE=$${TETHER_VM_CACHE:-$(TETHER_CACHE)/vm} ./test/vm/run.sh

# One table: tether against no tether, nftables and per-request OPA, measured in the same run
# (see docs/performance.md). Needs root and nftables (apt-get install nftables). BENCH_FLAGS are
# passed on (-rounds N, -rules 10,1000,10000, -scale F); `go test -bench .` adds the Go
# micro-benchmarks of the compiler.
BENCH_FLAGS ?=
bench: spire
	$(GO) build -o $(BIN)/bench ./test/bench
	$(GO) build -o $(BIN)/ ./cmd/tetherd ./cmd/tetherctl
	$(GO) test -run XXX -bench . -benchtime 3x ./pkg/compile
	$(GO) test -run XXX -bench . -benchtime 1x ./pkg/dnsproxy
	./$(BIN)/bench $(BENCH_FLAGS)

# Installs tetherd and tetherctl, the systemd unit, and (when there is none) the production
# configuration (deploy/systemd/tetherd.yaml) in /etc/tether. DESTDIR and PREFIX as usual. Then: systemctl daemon-reload &&
# systemctl enable --now tetherd.
PREFIX ?= /usr/local
install: build
	install -D -m 0755 -t $(DESTDIR)$(PREFIX)/bin $(BIN)/tetherd $(BIN)/tetherctl
	install -D -m 0644 deploy/systemd/tetherd.service $(DESTDIR)/etc/systemd/system/tetherd.service
	sed -i 's#/usr/local/bin/#$(PREFIX)/bin/#g' $(DESTDIR)/etc/systemd/system/tetherd.service
	install -d -m 0755 $(DESTDIR)/etc/tether
	test -e $(DESTDIR)/etc/tether/tetherd.yaml || install -m 0644 deploy/systemd/tetherd.yaml $(DESTDIR)/etc/tether/tetherd.yaml

vet:
	$(GO) vet ./...
	cd test/k8s && $(GO) vet ./...

# Each fuzz target (every parser of outside input) for a while: FUZZTIME=30s by default, 20s in
# .ci/run. Their seeds and every input that once failed are in testdata/fuzz/ (plain `go test`
# runs them); an input that fails is written there and fails this target (scripts/fuzz.sh; it
# also tells Go 1.26's fuzz deadline race, go.dev/issue/75804, from a failing input).
FUZZTIME ?= 30s
FUZZ_TARGETS = ./pkg/api:FuzzDecodeRegister ./pkg/api:FuzzDecodeStepup ./pkg/api:FuzzAPIRequest \
	./pkg/config:FuzzParse ./pkg/compile:FuzzCompile ./pkg/compile:FuzzDNSAnswer \
	./pkg/kernel:FuzzDecodeEvent ./pkg/identity:FuzzDecodeSVIDs ./pkg/policy:FuzzBundle
fuzz:
	GO=$(GO) ./scripts/fuzz.sh $(FUZZTIME) $(FUZZ_TARGETS)

# Start tetherd on its embedded defaults and show an agent being allowed and denied.
demo: build
	./scripts/demo.sh

clean:
	rm -rf $(BIN)
