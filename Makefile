GO ?= go
BIN := bin
export PATH := /usr/sbin:/usr/local/bin:$(PATH)

.PHONY: all build test lint check deps run bench clean fuzz deb zstack-store

all: build

# Static, as the packages build them (packaging/deb/build.sh).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/imagestore-agent ./cmd/imagestore-agent
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/imagestore ./cmd/imagestore

# deps installs, idempotently, the Debian packages the tests talk to.
deps:
	./.ci/deps

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	staticcheck ./...
	./.ci/importcheck
	$(GO) run ./.ci/statecheck

test:
	$(GO) test -race -count=1 -timeout 15m ./...

# check is the one command that runs the whole suite on a fresh machine.
check: deps lint test

run: build
	mkdir -p data
	./$(BIN)/imagestore-agent -profile imagestore -root ./data

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# fuzz runs every fuzz target for FUZZTIME (default 10s) each; FUZZ picks
# targets by regexp (.ci/fuzz). The normal suite runs their seeds only.
fuzz:
	GO=$(GO) ./.ci/fuzz

# deb builds dist/imagestore-agent_*.deb and dist/imagestore-client_*.deb
# with plain dpkg-deb (see packaging/deb/build.sh).
deb:
	GO=$(GO) ./packaging/deb/build.sh

# zstack-store builds dist/zstack-store.bin, the installer a ZStack management
# node runs on backup storage and KVM hosts (docs/zstack-install.md).
zstack-store:
	GO=$(GO) ./packaging/zstack/build.sh

clean:
	rm -rf $(BIN) dist
