# Everything a new machine needs, from nothing: `make serve` and `make test` (README's quick start).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    := .cache/data
ARM     := .cache/arm
KERNELS := $(wildcard core/kernels/*.pyx core/kernels/*.pxd core/kernels/*.h models/*.pyx)

.PHONY: serve test cross bench clean

# Serve the default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) on 127.0.0.1:8080.
serve: $(VENV)/.installed
	$(BIN)/edge fetch
	$(BIN)/edge serve

test: $(VENV)/.installed-test $(DATA)/botchan.txt cross $(ARM)/.ready
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

# aarch64: Debian's Python 3.11 and numpy unpacked into a root that qemu runs, and pytest and
# hypothesis (and tokenizers) from their aarch64 wheels: tests/test_aarch64.py runs the kernel and
# native-forward tests on NEON builds.
ARM_DEBS  := libc6 libgcc-s1 libgomp1 libstdc++6 python3.11-minimal libpython3.11-minimal \
             libpython3.11-stdlib libpython3.11-dev python3-numpy libblas3 liblapack3 libgfortran5 \
             libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libncursesw6 \
             libtinfo6 libreadline8 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 \
             libkrb5support0 libcom-err2 libkeyutils1
ARM_WHEELS := pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3 pygments==2.21.0 \
              hypothesis==6.170.17 attrs==26.1.0 sortedcontainers==2.4.0 tokenizers==0.23.3

$(ARM)/.ready: Makefile | $(VENV)/.installed cross
	dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
	apt-get update -qq
	rm -rf $(ARM) && mkdir -p $(ARM)/debs $(ARM)/root $(ARM)/site $(ARM)/wheels
	cd $(ARM)/debs && apt-get download -qq $(addsuffix :arm64,$(ARM_DEBS))
	for d in $(ARM)/debs/*.deb; do dpkg -x $$d $(ARM)/root; done
	ln -sf blas/libblas.so.3 $(ARM)/root/usr/lib/aarch64-linux-gnu/libblas.so.3
	ln -sf lapack/liblapack.so.3 $(ARM)/root/usr/lib/aarch64-linux-gnu/liblapack.so.3
	$(BIN)/python -m pip download -q --no-deps --only-binary :all: --platform manylinux2014_aarch64 \
	  --python-version 3.11 --implementation cp -d $(ARM)/wheels $(ARM_WHEELS)
	for w in $(ARM)/wheels/*.whl; do $(BIN)/python -m zipfile -e $$w $(ARM)/site; done
	touch $@

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
