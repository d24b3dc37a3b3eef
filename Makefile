# Two entry points for a fresh machine: `make demo` and `make test`. Both install everything first.
PY := .venv/bin/python
PIP := .venv/bin/pip
STACK := $(PY) infra/stack.py

.PHONY: install demo stack stack-s3 down status test redis chromium boost

# torch is pinned in the same pip command as everything that depends on it, so pip takes the CPU wheel
# on disk instead of resolving a multi-GB CUDA build. litdata depends on torchvision but never imports it;
# PyPI's wheel does not load beside the CPU torch 2.13 build ("operator torchvision::nms does not exist") and
# transformers' Llama import then fails, so it is removed again.
# KenLM's build (CPU) runs beside pip's downloads and unpacking (disk and network); its output goes to
# .venv/kenlm.log. (pip's byte-compiling stays: without it, processes that write no bytecode, such as
# multiprocessing's spawned workers here, compile torch and datatrove from source at every start.)
.venv/.installed: pyproject.toml infra/build_kenlm.py infra/fetch_models.py infra/build_base_model.py
	python3 -m venv .venv
	$(MAKE) -s boost
	$(PY) infra/build_kenlm.py > .venv/kenlm.log 2>&1 & kenlm=$$!; \
		$(PIP) install -q torch==2.13.0 -e '.[dev]' && \
		wait $$kenlm || { cat .venv/kenlm.log; exit 1; }
	$(PIP) uninstall -y -q torchvision
	$(PY) infra/fetch_models.py
	$(PY) infra/build_base_model.py
	touch $@

install: .venv/.installed

stack: install
	$(STACK) up --s3

down:
	$(STACK) down

status:
	$(STACK) status

demo: stack
	$(PY) infra/demo.py

# KenLM (the perplexity filter's n-gram models, built by infra/build_kenlm.py) needs Boost's headers and libraries.
BOOST := libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev
boost:
	@dpkg -s $(BOOST) >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $(BOOST) >/dev/null)

# The Redis-backed dedup index is tested against a real redis-server (Debian's package).
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

# The UI test drives the Prefect UI in Debian's chromium through Playwright (no browser download at run time).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Two test processes, one test file each at a time (module fixtures such as the e2e stack stay shared): the e2e
# file waits on servers, polling and retries for much of its 9 minutes, which the other process fills. (Three
# took longer: 17:41 against 15:21, their bursts of training and data stages contend for the 2 cores.)
test: install redis chromium
	$(PY) -m ruff check stages flows infra tests bench
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15
