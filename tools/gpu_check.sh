#!/usr/bin/env bash
# On a lent GPU machine (no network): install DALI from wheels carried in pieces under /tmp/parts, then run
# the GPU tests and the GPU benchmarks. Usage: bash tools/gpu_check.sh [install|test|bench|train|all]
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
  python3 -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py tests/test_train_gpu.py 2>&1 | tail -15
fi
if [[ ! -f /tmp/shards/dataset.json && $stage != install && $stage != test ]]; then
  SECONDS=0; timeout 150 python3 tools/make_sample_imagenet.py --out /tmp/sample --classes 20 --train-per-class 100 --val-per-class 20 \
    --layouts extracted --workers 16
  echo "sample: ${SECONDS}s"; timeout 150 python3 -c "import sys; from alexnet_pipeline.cli import prep_main; sys.exit(prep_main())" \
    --imagenet-root /tmp/sample/extracted --out /tmp/shards --shard-size 64 --no-progress | head -1
fi
if [[ $stage == bench || $stage == all ]]; then
  bench="python3 -c 'import sys; from alexnet_pipeline.cli import bench_main; sys.exit(bench_main())' pipeline"
  bench="$bench --shards /tmp/shards --device cuda --dtype float16"
  # Each step is time-boxed and saved as it ends, so a slow step still leaves the others' figures. Small
  # shards (64) so that every baseline worker has shards to read; 20 epochs of ~2,000 images per repeat so
  # that a timed repeat lasts over a second at GPU rates.
  timeout 150 bash -c "$bench --batch-size 256 --threads 12 --repeats 5 --epochs 20 --no-baseline" 2>&1 \
    | grep -v -E "nvjpeg2k|nvtiff|If using" | tee $OUT/dali.txt | tail -4
  timeout 200 bash -c "$bench --batch-size 256 --threads 16 --repeats 2 --epochs 1" 2>&1 \
    | grep -v -E "nvjpeg2k|nvtiff|If using" | tee $OUT/with_baseline.txt | tail -4
fi
if [[ $stage == train || $stage == all ]]; then
  # the training step fed by DALI vs by a batch held on the GPU: full-width paper AlexNet, bf16, channels_last
  train="python3 -c 'import sys; from alexnet_pipeline.cli import bench_main; sys.exit(bench_main())' train"
  train="$train --shards /tmp/shards --device cuda --threads 12 --repeats 5"
  for args in "--batch-size 128 --steps 50" "--batch-size 256 --steps 30" "--batch-size 128 --steps 50 --compile"; do
    echo "== $args"; timeout 240 bash -c "$train $args" 2>&1 | grep -v -E "nvjpeg2k|nvtiff|If using" | tail -4
  done | tee $OUT/train.txt
  # the trainer itself: its per-interval images/s and data-wait fraction on the GPU
  timeout 200 python3 -c "import sys; from alexnet_pipeline.cli import train_main; sys.exit(train_main())" \
    --shards /tmp/shards --out /tmp/run --epochs 4 --log-every 10 --threads 12 2>&1 \
    | grep -v -E "nvjpeg2k|nvtiff|If using" | tee $OUT/trainer.txt | tail -25
fi
