# meshid — the two commands a newcomer needs are `make run` and `make test`.
GO       ?= go
BUF      := $(GO) tool -modfile=tools/go.mod buf
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS  := -X github.com/meshid/meshid/internal/cli.Version=$(VERSION) \
            -X github.com/meshid/meshid/controlplane.Version=$(VERSION) \
            -X github.com/meshid/meshid/controlplane.Revision=$(REVISION)

.PHONY: run test build install check-static generate check-generate lint bench testbed testbed-up testbed-down testbed-env etcd run-ha

## run: a working identity plane on an embedded default, no config
run:
	$(GO) run -ldflags "$(LDFLAGS)" ./cmd/meshid dev

## run-ha: meshid highly available on this machine, in the foreground: a
## 3-member etcd on loopback, 3 `meshid server --store etcd` replicas and one
## agent listing all three (testbed/run-ha.sh; state in ./.run-ha, Ctrl-C
## stops it all). docs/ha.md walks through killing the leader.
run-ha:
	@GO=$(GO) testbed/run-ha.sh

## etcd: find or build etcd v3.7.0 (the test bed's, a cached build from the
## Go module proxy, or Debian's etcd-server >= 3.5); prints the binary's path
etcd:
	@GO=$(GO) testbed/etcd/build.sh | tail -n 1

## build: the meshid binary in ./bin, static (CGO_ENABLED=0) so it runs on
## distroless and Alpine as well as glibc systems
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/meshid ./cmd/meshid

## install: the same static binary into $(GOBIN) (default ~/go/bin), for the README tour
install:
	CGO_ENABLED=0 $(GO) install -trimpath -ldflags "$(LDFLAGS)" ./cmd/meshid

## image: the container image $(IMAGE) (default meshid:dev) from the
## Dockerfile, with docker or podman, whichever is installed
## (CONTAINER_TOOL=... to choose)
IMAGE          ?= meshid:dev
CONTAINER_TOOL ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
.PHONY: image
image:
	@test -n "$(CONTAINER_TOOL)" || { echo "make image: neither docker nor podman is installed; install one of them (or set CONTAINER_TOOL)" >&2; exit 1; }
	$(CONTAINER_TOOL) build --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -t $(IMAGE) .

## check-static: fail unless bin/meshid was built without cgo and links nothing dynamically
check-static: build
	@$(GO) version -m bin/meshid | grep -q 'CGO_ENABLED=0' || { echo "bin/meshid was built with cgo" >&2; exit 1; }
	@! { command -v ldd >/dev/null && ldd bin/meshid 2>&1 | grep -q '=>'; } || { echo "bin/meshid links shared libraries" >&2; ldd bin/meshid >&2; exit 1; }

## test: vet and every test, under the race detector (what CI runs), with the
## real-time CA rotation soak (MESHID_SOAK=1) that the fake-clock tests leave out,
## against one Kubernetes test bed started for the run and stopped after it
## (testbed/with-k8s.sh; the first run builds the bed's binaries, ~7 min)
test:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed in:" >&2; gofmt -l . >&2; exit 1; }
	$(GO) vet ./...
	GO=$(GO) testbed/with-k8s.sh env MESHID_SOAK=1 $(GO) test -race -count=1 -timeout 15m ./...

## generate: regenerate Go code from proto/ with buf and local plugins
generate:
	$(BUF) lint
	$(BUF) generate

## check-generate: fail if committed generated code differs from a fresh generate
check-generate: generate
	@git diff --exit-code -- proto/ || { echo "generated code is stale: run 'make generate' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- proto/)" || { echo "untracked generated files in proto/: run 'make generate' and commit" >&2; git status --porcelain -- proto/ >&2; exit 1; }

## bench: the Go benchmarks whose figures are in BENCHMARKS.md
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./ca/ ./store/...

# The hand-run test bed lives here (one per worktree); `make test` uses its own.
K8S_DIR ?= $(CURDIR)/.k8sbed

## testbed: build kube-apiserver, etcd and kubectl v1.37.2 (cached); prints their dir
testbed:
	@testbed/k8s/build.sh | tail -n 1

## testbed-up: start a Kubernetes test bed in $(K8S_DIR) for iterating; then
## `eval $$(make -s testbed-env)` and `go test ./pkg/ -run X`
testbed-up:
	@bin="$$(testbed/k8s/build.sh | tail -n 1)" && $(GO) run ./internal/k8stest/k8sbed up --bin "$$bin" --dir $(K8S_DIR)

## testbed-down: stop the bed testbed-up started
testbed-down:
	@$(GO) run ./internal/k8stest/k8sbed down --dir $(K8S_DIR)

## testbed-env: the export line that points tests at the testbed-up bed
testbed-env:
	@test -f $(K8S_DIR)/state.json || { echo "no test bed in $(K8S_DIR): run make testbed-up" >&2; exit 1; }
	@echo "export MESHID_K8S_DIR=$(K8S_DIR)"
