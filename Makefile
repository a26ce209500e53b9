# Two commands on a fresh machine:  `make demo` (main job on the sample data)  and  `make test`.
# Both first install what is missing into .venv (once; re-done when pyproject.toml or this file changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE := data/sample
SHARDS := data/shards
# Pillow-SIMD's speed comes from AVX2; build without it on CPUs that lack it.
SIMD_CC := $(if $(shell grep -m1 -o avx2 /proc/cpuinfo 2>/dev/null),cc -mavx2,cc)

.PHONY: install demo test sample bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# A CPU machine gets the pinned CPU wheel (an unpinned torch pulls several GB of CUDA packages).
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[test]'
	@# Pillow-SIMD last: any package depending on pillow would silently replace it.
	$(BIN)/pip uninstall -y -q pillow pillow-simd
	CC="$(SIMD_CC)" $(BIN)/pip install -q --no-deps --no-cache-dir pillow-simd \
	  || { echo "Pillow-SIMD failed to build; falling back to Pillow" >&2; $(BIN)/pip install -q pillow; }
	$(BIN)/alexnet-prep --version
	touch $@

$(SAMPLE)/.done: tools/make_sample_imagenet.py $(STAMP)
	$(BIN)/python tools/make_sample_imagenet.py --out $(SAMPLE)
	touch $@

sample: $(SAMPLE)/.done

demo: $(STAMP) $(SAMPLE)/.done
	rm -rf $(SHARDS)
	$(BIN)/alexnet-prep --imagenet-root $(SAMPLE)/extracted --out $(SHARDS) --shard-size 100
	$(BIN)/alexnet-prep --verify $(SHARDS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP) $(SAMPLE)/.done
	$(BIN)/alexnet-bench prep --imagenet-root $(SAMPLE)/extracted

clean:
	rm -rf $(VENV) data
