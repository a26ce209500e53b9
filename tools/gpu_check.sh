#!/usr/bin/env bash
# The GPU checks and benchmarks, on a machine with a CUDA GPU and torch but no network and no DALI.
#
#   bash tools/gpu_check.sh WHEELS STAGE [STAGE ...]
#
# WHEELS: a directory holding either *.whl files (DALI and what it needs; see tools/gpu_bundle.sh) or the
# pieces of a bundle made by tools/gpu_bundle.sh (site.tar.xz.*, joined in name order). The device tool
# carries 64 MiB a call, so each call carries one piece and first copies it into WHEELS (e.g. /tmp/wheels, kept
# while the machine stays warm); stages that need no DALI (feed-data, step) run before the last piece arrives:
#   call 1: cp gpu_bundle/site.tar.xz.0 /tmp/wheels/ && bash tools/gpu_check.sh /tmp/wheels feed-data
#   call 2: cp gpu_bundle/site.tar.xz.1 /tmp/wheels/ && bash tools/gpu_check.sh /tmp/wheels step
#   call 3: cp gpu_bundle/site.tar.xz.2 /tmp/wheels/ && bash tools/gpu_check.sh /tmp/wheels install feed They are installed
# under $SITE (default /tmp/site), which goes first on PYTHONPATH. Each stage writes its figures to
# $OUT/<stage>.txt (default OUT=/tmp/gpu_check) and prints the last lines; stages are time-boxed so that a
# slow one still leaves the others' figures. Stages:
#   install   unpack WHEELS (skipped when $SITE already imports DALI)
#   shards    a 20-class sample and its shards in $WORK/shards (the benchmarks' data)
#   test      the GPU tests (tests/*_gpu.py)
#   step      tools/step_profile.py: images/s and kernels, from the old step to the current one
#   train     alexnet-bench train --compile at batch 128: synthetic / DALI decoding variants / DataLoader, profile
#   train-eager  the same without torch.compile, synthetic and DALI only
#   pipeline  alexnet-bench pipeline: the loaders alone, train and ten-crop
#   trainer   alexnet-train --compile itself for 3 epochs: its logged images/s
#   learn     1,000-class sample, then 3,000+ steps of the full-width model with the paper's and Caffe's init
#   feed-data the feed set: 1,000 classes x 50 train (+10 val) images, prepped into 1,000-sample shards
#             (torch only: it runs before DALI is installed); its timings and JPEG bytes per image
#   feed      on the feed set: the loader alone over its axes (alexnet-bench loader), the step fed by each
#             loader (alexnet-bench train), alexnet-train for 3 epochs, the two-ranks test, and the record
#             $OUT/h200_feed.json (tools/feed_record.py)
set -uo pipefail
[[ $# -ge 2 ]] || { sed -n '2,20p' "$0"; exit 2; }
WHEELS=$(realpath "$1"); shift
OUT=${OUT:-/tmp/gpu_check}; SITE=${SITE:-/tmp/site}; WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
quiet() { grep -v -E "nvjpeg2k|nvtiff|If using|UserWarning|warnings.warn"; }
run() {  # run STAGE SECONDS COMMAND...: time-boxed, output to $OUT/STAGE.txt, last lines printed
  local stage=$1 limit=$2; shift 2
  echo "== $stage ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | quiet > "$OUT/$stage.txt"
  echo "   exit ${PIPESTATUS[0]}"; tail -n 25 "$OUT/$stage.txt"
}
install() {
  $PY -c "import nvidia.dali" 2>/dev/null && return 0
  mkdir -p "$SITE"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  else  # the bundle holds site/...: unpack it next to $SITE's parent and move it in place
    cat $(ls "$WHEELS"/site.tar.xz.* | sort) | xz -d -T0 | tar -x -C "$WORK" && cp -a "$WORK/site/." "$SITE/"
  fi
  $PY -c "import nvidia.dali as d, torch; print('DALI', d.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
}
shards() {
  [[ -f $WORK/shards/dataset.json ]] && return 0
  $PY tools/make_sample_imagenet.py --out "$WORK/sample" --classes 20 --train-per-class 100 --val-per-class 20 \
    --layouts extracted --workers 16 && \
  $PY -m alexnet_pipeline prep --imagenet-root "$WORK/sample/extracted" --out "$WORK/shards" --shard-size 64 --no-progress
}
learn() {  # the full-width model on 1,000 classes: does the paper's init learn? Caffe's beside it.
  $PY tools/make_sample_imagenet.py --out "$WORK/s1000" --classes 1000 --train-per-class 40 --val-per-class 10 \
    --layouts extracted --workers 16 || return 1
  $PY -m alexnet_pipeline prep --imagenet-root "$WORK/s1000/extracted" --out "$WORK/shards1000" --no-progress || return 1
  for init in paper caffe; do  # 40,007 images / 128 = 313 steps per epoch: 10 epochs = 3,130 steps
    $PY -m alexnet_pipeline train --shards "$WORK/shards1000" --out "$WORK/learn_$init" --init "$init" --epochs 10 \
      --log-every 25 --threads 14 --no-final-tencrop | grep -E "^epoch [0-9]+/[0-9]+:|training|img/s" | awk 'NR % 4 == 1'
    cp "$WORK/learn_$init/log.jsonl" "$OUT/learn_$init.jsonl"
  done
}
FEED=$WORK/feed_shards
feed_data() {
  local t0=$SECONDS
  $PY tools/make_sample_imagenet.py --out "$WORK/feed_sample" --classes 1000 --train-per-class 50 \
    --val-per-class 10 --layouts extracted --workers 16 || return 1
  echo "sample maker: $((SECONDS - t0)) s"; t0=$SECONDS
  $PY -m alexnet_pipeline prep --imagenet-root "$WORK/feed_sample/extracted" --out "$FEED" --no-progress || return 1
  echo "prep: $((SECONDS - t0)) s"
  $PY -c "import sys; sys.path.insert(0, 'tools'); import feed_record as f; print('JPEG bytes per image:', \
round(f.jpeg_bytes_per_image(__import__('pathlib').Path('$FEED'))))"
}
feed() {
  local bench="$PY -m alexnet_pipeline bench"
  timeout 200 $bench loader --shards "$FEED" --device cuda --steps 100 --repeats 3 --json > "$OUT/feed_loader.json"
  echo "loader: exit $?"
  timeout 200 $bench train --shards "$FEED" --device cuda --steps 100 --repeats 5 --json \
    --feeds synthetic,dali,dali-run2,dali-run4,dali-run8,dali-cpu > "$OUT/feed_bench.json"
  echo "bench train: exit $?"
  rm -rf "$WORK/feed_run"
  timeout 200 $PY -m alexnet_pipeline train --shards "$FEED" --out "$WORK/feed_run" --epochs 3 --log-every 25 \
    --no-final-tencrop | grep -E "^epoch [0-9]+/3:|training|img/s" | awk 'NR % 4 == 1'
  cp "$WORK/feed_run/log.jsonl" "$OUT/feed_train.jsonl"
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_train_gpu.py -k two_ranks > "$OUT/feed_two_ranks.txt" 2>&1
  tail -n 3 "$OUT/feed_two_ranks.txt"
  $PY tools/feed_record.py --shards "$FEED" --loader "$OUT/feed_loader.json" --bench "$OUT/feed_bench.json" \
    --train-log "$OUT/feed_train.jsonl" --two-ranks "$OUT/feed_two_ranks.txt" --out "$OUT/h200_feed.json"
}
for stage in "$@"; do
  case $stage in
    install)  install 2>&1 | quiet | tail -3 ;;
    shards)   run shards 150 bash "$0" "$WHEELS" _shards ;;
    test)     run test 420 $PY -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py tests/test_train_gpu.py ;;
    step)     run step 300 $PY tools/step_profile.py --json "$OUT/step.json" ;;
    train)    run train 300 $PY -m alexnet_pipeline bench train --shards "$WORK/shards" --device cuda --threads 14 \
                --steps 50 --repeats 5 --profile --compile \
                --feeds synthetic,dali,dali-cpu,dali-hw0,dali-hw0.5,dali-hw0.9,dali-hw1,dataloader ;;
    train-eager) run train-eager 200 $PY -m alexnet_pipeline bench train --shards "$WORK/shards" --device cuda \
                --threads 14 --steps 50 --repeats 5 --profile --feeds synthetic,dali ;;
    pipeline) run pipeline 200 $PY -m alexnet_pipeline bench pipeline --shards "$WORK/shards" --device cuda \
                --dtype float16 --batch-size 256 --threads 14 --repeats 5 --steps 100 --no-baseline ;;
    trainer)  rm -rf "$WORK/run"; run trainer 240 $PY -m alexnet_pipeline train --shards "$WORK/shards" \
                --out "$WORK/run" --epochs 3 --log-every 5 --threads 14 --compile ;;
    learn)    run learn 540 bash "$0" "$WHEELS" _learn ;;
    feed-data) run feed-data 240 bash "$0" "$WHEELS" _feed_data ;;
    feed)     run feed 480 bash "$0" "$WHEELS" _feed ;;
    _feed_data) feed_data ;;
    _feed)    feed ;;
    _shards)  shards ;;  # the time-boxed bodies of shards and learn
    _learn)   learn ;;
    *)        echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
