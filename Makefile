# mod_mam_rs: build, install, run and test.
#
#   make build     build/plugins/mod_mam_rs/ (the shim and the .so), ready for plugin_paths
#   make install   into Prosody's plugin directory (PREFIX, DESTDIR, PLUGIN_DIR respected)
#   make run       a local Prosody on 127.0.0.1 with mod_mam_rs and two accounts
#   make test      every test: cargo test, busted specs, end-to-end against a real Prosody (0.12, and 13
#                  on SQLite), fuzz smoke
#   make bench     stock mod_mam vs mod_mam_rs vs an in-memory reference, end to end, as ratios
#                  (quick: 50k-message archive; the record: make bench ROWS=1000000)
#   make bench-micro  criterion benchmarks of the hot functions and the writer

PREFIX ?= /usr/local
PLUGIN_DIR ?= $(PREFIX)/lib/prosody/modules
DESTDIR ?=
CARGO ?= cargo
PYTHON ?= python3
LUA ?= lua5.4

NATIVE := mam_rs_native
SO_BUILT := target/release/lib$(NATIVE).so
PLUGIN := build/plugins/mod_mam_rs
VENV := .venv
# lua-unbound is one of Prosody's Recommends, which apt installs by default: without it every
# prosodyctl command starts with a banner asking for it.
APT_PACKAGES := prosody lua-unbound lua5.4 lua-dbi-sqlite3
# The tests also start their own PostgreSQL and MariaDB (tools/with-postgres.sh,
# tests/e2e/dbservers.py; no system service is used), and Prosody reaches them through
# LuaDBI's drivers. `make run` does not need these.
TEST_APT_PACKAGES := lua-busted postgresql mariadb-server mariadb-client lua-dbi-postgresql lua-dbi-mysql

# Run apt-get as root, or through sudo when we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all build install uninstall run test test-rust deps-test deps-prosody13 apt-install test-spec test-e2e test-e2e-prosody13 test-fuzz bench bench-alloc bench-instr bench-profile bench-micro bench-lua deps deps-python lint clean dist

all: build

## Installs the Debian packages (and, for the tests, the Python environment) that are missing.
deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

deps-test: deps
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(TEST_APT_PACKAGES)"

apt-install:
	@missing=""; \
	for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if ! command -v $(PYTHON) >/dev/null 2>&1 || ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
		missing="$$missing python3 python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

deps-python: deps-test
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

build:
	$(CARGO) build --release --locked
	@mkdir -p $(PLUGIN)
	install -m 644 lua/mod_mam_rs.lua $(PLUGIN)/mod_mam_rs.lua
	install -m 644 lua/commands.lib.lua $(PLUGIN)/commands.lib.lua
	@# A new file, then a rename: a running Prosody keeps its mapped copy intact.
	install -m 755 $(SO_BUILT) $(PLUGIN)/$(NATIVE).so.new
	mv -f $(PLUGIN)/$(NATIVE).so.new $(PLUGIN)/$(NATIVE).so

install: build
	install -d $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs
	install -m 644 lua/mod_mam_rs.lua $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs/mod_mam_rs.lua
	install -m 644 lua/commands.lib.lua $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs/commands.lib.lua
	install -m 755 $(SO_BUILT) $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs/$(NATIVE).so.new
	mv -f $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs/$(NATIVE).so.new $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs/$(NATIVE).so

uninstall:
	rm -rf $(DESTDIR)$(PLUGIN_DIR)/mod_mam_rs

## A local server for trying it with any client: see README.md "Try it".
run: deps build
	@tools/run-local.sh

test: deps-python build test-rust test-spec test-e2e test-e2e-prosody13 test-fuzz

## The store suite runs on SQLite and on a throwaway PostgreSQL and MariaDB server
## (tools/with-postgres.sh, tools/with-mariadb.sh).
test-rust: deps-test
	tools/with-postgres.sh tools/with-mariadb.sh $(CARGO) test --no-default-features --features postgres-tests,mysql-tests --locked


test-spec: deps-test build
	$(LUA) /usr/bin/busted --lpath='./spec/?.lua' spec

## The end-to-end suite once per archive backend: the SQLite file, then a real PostgreSQL and a
## real MariaDB that the suite starts (tests/e2e/dbservers.py). One only: E2E_BACKENDS=sqlite.
E2E_BACKENDS ?= sqlite postgres mariadb

test-e2e: deps-python build
	@set -e; for backend in $(E2E_BACKENDS); do \
		echo "== end-to-end suite$(if $(E2E_ON), on $(E2E_ON)), archive on $$backend"; \
		MAM_E2E_BACKEND=$$backend $(VENV)/bin/python -m pytest tests/e2e -q -p no:cacheprovider; \
	done

## The end-to-end suite again on Prosody 13 (Debian's bookworm-backports package, as Debian 13
## ships it), unpacked into build/prosody13 beside the system's 0.12 (tools/fetch-prosody13.sh).
## The archive on SQLite by default; E2E_BACKENDS_PROSODY13="sqlite postgres mariadb" for all.
PROSODY13 := build/prosody13
E2E_BACKENDS_PROSODY13 ?= sqlite

deps-prosody13: deps
	@tools/fetch-prosody13.sh $(PROSODY13)

test-e2e-prosody13: deps-prosody13
	@PATH="$(abspath $(PROSODY13))/bin:$$PATH" $(MAKE) --no-print-directory test-e2e \
		E2E_BACKENDS="$(E2E_BACKENDS_PROSODY13)" \
		E2E_ON="Prosody $$(cat $(PROSODY13)/root/usr/lib/prosody/prosody.version)"

## A short run of every fuzz target (cargo-fuzz on the stable toolchain; installs it when
## missing). Longer: FUZZ_SECONDS=300 tools/fuzz-smoke.sh
test-fuzz:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-10} tools/fuzz-smoke.sh

## End to end, one run, every module side by side (README.md, "Benchmark"). Knobs, all
## optional: ROWS (archive size, default 50000), CLIENTS, MSGS (throughput), SAMPLES (queries
## per page shape), HEAVY (seconds), WALK_MAX, WORKDIR, PLUGIN_DIR_BENCH (another build of
## the module), BENCH_ARGS (anything else; see tests/e2e/bench_vs_stock.py --help).
BENCH_KNOBS := $(if $(ROWS),--rows $(ROWS)) $(if $(CLIENTS),--clients $(CLIENTS)) $(if $(MSGS),--msgs $(MSGS)) \
	$(if $(SAMPLES),--samples $(SAMPLES)) $(if $(HEAVY),--heavy $(HEAVY)) $(if $(WALK_MAX),--walk-max $(WALK_MAX)) \
	$(if $(WORKDIR),--workdir $(WORKDIR))

bench: deps-python build
	$(VENV)/bin/python tests/e2e/bench_vs_stock.py --plugin-dir $(or $(PLUGIN_DIR_BENCH),$(PLUGIN)) $(BENCH_KNOBS) $(BENCH_ARGS)

## Criterion: query parsing, result building, ids, classification, the writer against
## SQLite's own batched insert rate, query pages on a 1M-row archive; then the native calls of
## the archive path timed from Lua (bench-lua).
bench-micro: bench-lua
	$(CARGO) bench --no-default-features --locked

## Lua heap allocated per archived message (the collector stopped): no archive module, stock
## mod_mam, mod_mam_rs. Deterministic, unlike timings: see tests/e2e/bench/alloc.py.
bench-alloc: deps-python build
	$(VENV)/bin/python tests/e2e/bench_alloc.py --plugin-dir $(or $(PLUGIN_DIR_BENCH),$(PLUGIN))

## Instructions Prosody executes per archived message, counted under valgrind's callgrind: no
## archive module, stock mod_mam, mod_mam_rs, the main thread apart from the module's. Steady
## from one run to the next, unlike CPU times: see tests/e2e/bench/instr.py.
bench-instr: deps-python build
	@$(MAKE) --no-print-directory apt-install PACKAGES="valgrind"
	$(VENV)/bin/python tests/e2e/bench_instr.py --plugin-dir $(or $(PLUGIN_DIR_BENCH),$(PLUGIN))

## Where those instructions go: bench-instr's floor and mod_mam_rs on a Lua built with symbols
## (tools/build-lua-debug.sh), then the functions whose own instructions per message on the
## main thread differ most from the floor's.
bench-profile: deps-python build
	@$(MAKE) --no-print-directory apt-install PACKAGES="valgrind"
	@tools/build-lua-debug.sh build/lua-debug
	$(VENV)/bin/python tests/e2e/bench_instr.py --plugin-dir $(or $(PLUGIN_DIR_BENCH),$(PLUGIN)) --only floor,rs \
		--lua $(CURDIR)/build/lua-debug/lua --functions $(or $(FUNCTIONS),40)

## The native calls the archive path makes on Prosody's loop, per call: time and Lua garbage.
bench-lua: build
	$(LUA) benches/lua_surface.lua $(PLUGIN)/mam_rs_native.so

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --no-default-features --all-targets -- -D warnings
	$(CARGO) clippy --release -- -D warnings

clean:
	rm -rf build target

## A source tarball for the rockspec (prosodyctl install).
dist:
	git archive --format=tar.gz --prefix=mod_mam_rs-0.1.0/ -o mod_mam_rs-0.1.0.tar.gz HEAD
