# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install sysdeps demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: anything else lets pip pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,s3,hf,fbank,asr,bench,cluster,teacher-demo]'
	touch $(STAMP)

install: $(STAMP)

# System packages the demo and tests use (speech synthesis). Skipped when already present.
sysdeps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  SUDO=$$(command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null; }

test: install sysdeps
	$(PY) -m pytest -q tests

# `make demo S3_ENDPOINT=http://host:port` writes the label stores to that S3 endpoint instead of local disk.
demo: install sysdeps
	$(PY) -m distill.demo --workdir demo_out $(if $(S3_ENDPOINT),--s3-endpoint $(S3_ENDPOINT))

bench: install
	$(PY) bench/codec_vs_reference.py --quick
	$(PY) bench/store_io.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
