# Everything a new machine needs, from nothing: `make serve` and `make test` (README's quick start).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    := .cache/data
KERNELS := $(wildcard core/kernels/*.pyx core/kernels/*.pxd core/kernels/*.h models/*.pyx)

.PHONY: serve test cross bench clean

# Serve the default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) on 127.0.0.1:8080.
serve: $(VENV)/.installed
	$(BIN)/edge fetch
	$(BIN)/edge serve

test: $(VENV)/.installed-test $(DATA)/botchan.txt cross
	$(BIN)/edge fetch
	$(BIN)/python -m pytest -q tests

$(VENV)/.installed: pyproject.toml setup.py $(KERNELS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[convert]'
	$(BIN)/python -m compileall -q core models edge   # bytecode, as a regular install has: a faster cold start
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Real English text for perplexity: botchan.txt from the sentencepiece source distribution.
$(DATA)/botchan.txt:
	mkdir -p $(DATA)/sdist
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: sentencepiece==0.2.3 -d $(DATA)/sdist
	tar -xzf $(DATA)/sdist/sentencepiece-0.2.3.tar.gz -C $(DATA)/sdist --wildcards '*/botchan.txt'
	cp $$(find $(DATA)/sdist -name botchan.txt | head -1) $@

# aarch64 cross compiler and qemu: the NEON bodies of the kernels are tested under emulation.
cross:
	command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; }

bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/edge fetch
	$(BIN)/python bench/bench_llamacpp.py
	$(BIN)/python bench/bench_peers.py

clean:
	rm -rf build $(VENV) .cache core/kernels/*.so core/kernels/*.c models/*.so models/*.c
