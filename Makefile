# AIGateway developer entry points. `make test` and `make dev` are the two commands the README promises.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

TESTBED := scripts/testbed
TESTBED_ENV = $(shell $(TESTBED) env-path)
# Load the test bed's env file (KUBECONFIG, DATABASE_URL, …) into a recipe's shell.
WITH_ENV = set -a && source "$(TESTBED_ENV)" && set +a &&

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: toolchain
toolchain: ## install the Rust components and the wasm target (rust-toolchain.toml pins the version)
	rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
	rustup component add rustfmt clippy
	rustup target add wasm32-wasip1

.PHONY: testbed
testbed: ## install and start the local servers (idempotent)
	$(TESTBED) up

.PHONY: migrate
migrate: testbed ## apply the MySQL and ClickHouse migrations to the test bed
	$(WITH_ENV) cargo run --quiet -p aigw-migrations --bin aigw-migrate

.PHONY: crds
crds: testbed ## install our CRDs into the test bed
	$(WITH_ENV) "$$KUBECTL" apply --server-side --force-conflicts --field-manager=aigw-dev -f crds/crds.yaml >/dev/null
	$(WITH_ENV) "$$KUBECTL" wait --for condition=established --timeout=60s -f crds/crds.yaml >/dev/null

.PHONY: test
test: toolchain testbed migrate crds ## test bed up → migrations → CRDs → every test → the plugin's wasm build
	cargo test --workspace --no-fail-fast
	$(MAKE) wasm

.PHONY: wasm
wasm: ## build the usage-reporter plugin for wasm32-wasip1
	cargo build -p aigw-plugin --target wasm32-wasip1 --profile wasm
	@ls -l target/wasm32-wasip1/wasm/aigw_plugin.wasm

.PHONY: dev
dev: toolchain testbed migrate crds ## the product locally: test bed, our CRDs, operator + apiserver + billing + the Higress stand-in in the foreground
	cargo build --workspace --bins
	$(MAKE) wasm
	$(WITH_ENV) exec scripts/dev

.PHONY: lint
lint: ## rustfmt, clippy (pedantic, -D warnings), shell scripts
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	bash -n $(TESTBED) scripts/*.sh scripts/dev .ci/run

.PHONY: fmt
fmt: ## format the code
	cargo fmt --all

.PHONY: generate
generate: ## regenerate committed artefacts: crds/crds.yaml from the CRD types, apiserver/openapi.json from the handlers
	cargo run --quiet -p aigw-crds --bin crdgen > crds/crds.yaml.tmp
	mv crds/crds.yaml.tmp crds/crds.yaml
	cargo run --quiet -p aigw-apiserver -- openapi > apiserver/openapi.json.tmp
	mv apiserver/openapi.json.tmp apiserver/openapi.json

.PHONY: bench
BENCH_LOG := target/bench.log

bench: toolchain testbed migrate crds ## benchmarks: usage parser, billing pipeline, authz load, sign-in cost and token verification, REST lists, operator scale, data-plane plugin cost; ends with one table of each measure against its reference (numbers: docs/benchmarks.md)
	@mkdir -p target && : > $(BENCH_LOG)
	cargo bench -p aigw-plugin --bench parser | tee -a $(BENCH_LOG)
	cargo build --release -p aigw-billing
	cargo bench -p aigw-billing --bench pipeline | tee -a $(BENCH_LOG)
	cargo bench -p aigw-apiserver --bench authz | tee -a $(BENCH_LOG)
	cargo bench -p aigw-apiserver --bench sso | tee -a $(BENCH_LOG)
	cargo bench -p aigw-apiserver --bench api | tee -a $(BENCH_LOG)
	cargo build --release -p aigw-operator
	cargo bench -p aigw-operator --bench scale | tee -a $(BENCH_LOG)
	cargo bench -p aigw-operator --bench dataplane | tee -a $(BENCH_LOG)
	@echo "restarting the test bed so later tests start from a clean cluster"
	$(TESTBED) down && $(TESTBED) up
	@printf '\n## make bench: each measure and its reference, measured in this run\n\n| measure | value | reference | ratio | aim |\n|---|---:|---|---:|---|\n'
	@sed -n 's/^ratio: //p' $(BENCH_LOG)

.PHONY: fuzz
fuzz: toolchain ## mutation-fuzz the usage parser for AIGW_FUZZ_SECS seconds (default 60)
	AIGW_FUZZ_SECS=$${AIGW_FUZZ_SECS:-60} cargo test --release -p aigw-plugin-core --test fuzz -- --nocapture

.PHONY: down
down: ## stop the test bed
	$(TESTBED) down

.PHONY: images
images: toolchain ## OCI image layouts of the four binaries and the usage reporter's Wasm image in target/images (push with skopeo or crane)
	cargo build --release --workspace --bins
	$(MAKE) wasm
	rm -rf target/images
	for b in aigw-operator aigw-apiserver aigw-billing aigw-migrate; do \
	  python3 scripts/oci-image.py binary --name $$b --binary target/release/$$b --out target/images/$$b; done
	python3 scripts/oci-image.py wasm --name aigw-plugin --wasm target/wasm32-wasip1/wasm/aigw_plugin.wasm --out target/images/aigw-plugin
