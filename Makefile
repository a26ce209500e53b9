# Two commands on a fresh machine:  `make demo` (main job on the sample data)  and  `make test`.
# Both first install what is missing into .venv (once; re-done when pyproject.toml or this file changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE := data/sample
SHARDS := data/shards
RUN    := data/run
PREP    = $(BIN)/alexnet-prep --imagenet-root $(SAMPLE)/extracted --out $(SHARDS) --shard-size 100
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

# The whole story on the sample: prep, a couple of minutes of CPU training (a quarter-width AlexNet, batch 32,
# lr 0.001 divided by 10 after epoch 10, torch's momentum rule: on this small set, over three seeds, the paper's
# rule made the validation error jump by 4-19 points at the drop and torch's let it fall; docs/results.md, "The
# demo (CPU)"), ten-crop evaluation with the paper's figures, and two sample images classified. Expect top-1
# error far below chance (90% for 10 classes).
DEMO_IMAGES = $$(ls $(SAMPLE)/extracted/val/n01440764/*.JPEG | head -1) $$(ls $(SAMPLE)/extracted/val/n01443537/*.JPEG | head -1)
demo: $(STAMP) $(SAMPLE)/.done
	rm -rf $(SHARDS) $(RUN)
	$(PREP)
	$(BIN)/alexnet-prep --verify $(SHARDS)
	$(BIN)/alexnet-train --shards $(SHARDS) --out $(RUN) --width 0.25 --global-batch 32 --epochs 15 --log-every 13 \
	  --lr 0.001 --schedule step --step-epochs 10 --momentum-rule torch --no-final-tencrop
	$(BIN)/alexnet-eval --shards $(SHARDS) --checkpoint $(RUN)/checkpoint.pt --tencrop --figures
	$(BIN)/alexnet-predict $(DEMO_IMAGES) --checkpoint $(RUN)/best.pt --top 3
	@echo "curves: $(RUN)/curves.png $(RUN)/filters.png   figures: $(RUN)/figures/{filters,predictions,neighbours}.png"

# Lint (ruff: pyflakes, bugbear, isort, line length) and types (mypy), configured in pyproject.toml, then the tests
# on every core (pytest-xdist; `.venv/bin/python -m pytest` alone runs them in one process), printing each skip's
# reason (a skip outside tests/skip_policy.py's short list fails) and the ten slowest tests.
test: $(STAMP)
	$(BIN)/ruff check alexnet_pipeline tools tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -rs -n auto --durations=10

$(SHARDS)/dataset.json: $(SAMPLE)/.done
	$(PREP)

bench: $(STAMP) $(SHARDS)/dataset.json
	$(BIN)/alexnet-bench prep --imagenet-root $(SAMPLE)/extracted
	$(BIN)/alexnet-bench pipeline --shards $(SHARDS) --batch-size 64 --steps 20
	$(BIN)/alexnet-bench train --shards $(SHARDS) --width 0.25 --batch-size 32 --steps 10

clean:
	rm -rf $(VENV) data
