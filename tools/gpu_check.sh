#!/usr/bin/env bash
# On a lent GPU machine (no network): install DALI from wheels carried in pieces under /tmp/parts, then run
# the GPU tests and the GPU pipeline benchmark. Usage: bash tools/gpu_check.sh [install|test|bench|all]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
stage=${1:-all}
if [[ $stage == install || $stage == all ]]; then
  cat /tmp/parts/part_* | tar -x -C /tmp && rm -rf /tmp/parts
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheels/*.whl
  python3 -c "import nvidia.dali as d, torch; print('DALI', d.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
fi
if [[ $stage == test || $stage == all ]]; then
  nvidia-smi -L
  python3 -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py tests/test_pipeline.py 2>&1 | tail -15
fi
if [[ $stage == bench || $stage == all ]]; then
  python3 tools/make_sample_imagenet.py --out /tmp/sample --classes 20 --train-per-class 250 --val-per-class 50 \
    --layouts extracted --workers 16
  python3 -c "import sys; from alexnet_pipeline.cli import prep_main; sys.exit(prep_main())" \
    --imagenet-root /tmp/sample/extracted --out /tmp/shards --no-progress | head -1
  for bs in 256 512; do
    python3 -c "import sys; from alexnet_pipeline.cli import bench_main; sys.exit(bench_main())" pipeline \
      --shards /tmp/shards --device cuda --dtype float16 --batch-size $bs --threads 8 --repeats 5 --epochs 10 \
      --json > $OUT/bench_gpu_bs$bs.json && python3 - "$OUT/bench_gpu_bs$bs.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k in ("train", "tencrop_eval"):
    print(sys.argv[1].rsplit("/", 1)[-1], k, {n: round(v) for n, v in r[k]["images_per_s"].items()},
          "x base %.1f" % r[k]["dali_over_baseline"], "x decode %.2f" % r[k]["dali_over_decode_only"])
PY
  done
fi
