#!/usr/bin/env bash
# The GPU checks and benchmarks, on a machine with a CUDA GPU and torch but no network and no DALI.
#
#   bash tools/gpu_check.sh WHEELS STAGE [STAGE ...]
#   bash tools/gpu_check.sh --plan             # the feed round's calls, their commands' time boxes and limits
#
# WHEELS: a directory holding either *.whl files (DALI and what it needs; see tools/gpu_bundle.sh) or the
# pieces of a bundle made by tools/gpu_bundle.sh (site.tar.xz.0, .1, .2, joined in name order). The device tool
# carries 64 MiB a call and gpu_bundle/ is ignored by git, so each call names its piece in `carry` and copies it
# into WHEELS (/tmp survives between calls while the machine stays warm). The feed round is three calls:
#   call 1 (carry gpu_bundle/site.tar.xz.0): mkdir -p /tmp/wheels && cp gpu_bundle/site.tar.xz.0 /tmp/wheels/ &&
#          OUT=$OUT bash tools/gpu_check.sh /tmp/wheels feed-data         # <= 3 min: make and prep the feed set
#   call 2 (.1): the same with step                                          # <= 3 min: the synthetic step
#   call 3 (.2): the same with feed, and COMMIT=<sha> in front               # <= 5 min: install and measure
# Every command runs inside its time box (BOX below); the boxes of a call add up to at most its limit (LIMIT),
# checked before anything runs. Each command's figures go to $OUT as soon as they exist, and the third call
# rewrites $OUT/h200_feed.json (tools/feed_record.py) after each of its commands, most important first:
# alexnet-train's logged rate, alexnet-bench train (synthetic against the default feed), the loader table, the
# two-ranks test. A call that finds the machine cold (no pieces, no feed set) fails in seconds.
#
# Sizes come from the environment, so that tests/test_tools.py runs the whole round on the CPU on tiny data
# (DEVICE=cpu FEED_CLASSES=... and so on); the defaults are the GPU round's.
#
# Other stages (not part of the feed round): install, shards (a 20-class sample), test (tests/*_gpu.py), train
# (alexnet-bench train over decoding variants with a profile), train-eager, pipeline, trainer, learn (1,000
# classes with the paper's and Caffe's init). Each writes $OUT/<stage>.txt (default OUT=/tmp/gpu_check).
set -uo pipefail
# The feed round: each call's limit and each command's box, in seconds (start-up and transfers come on top;
# a round has 15 minutes of machine time in all).
declare -A LIMIT=([feed-data]=180 [step]=180 [feed]=300)
declare -A BOX=([make]=110 [prep]=55 [step]=170 [install]=25 [train]=100 [bench]=65 [loader]=70 [two-ranks]=40)
declare -i failed
declare -A CALL=([feed-data]="make prep" [step]="step" [feed]="install train bench loader two-ranks")
plan() {
  local call cmd sum status=0
  for call in feed-data step feed; do
    sum=0
    for cmd in ${CALL[$call]}; do sum=$((sum + BOX[$cmd])); done
    echo "$call: ${CALL[$call]} = $sum s of $((LIMIT[$call])) s"
    ((sum <= LIMIT[$call])) || { echo "  the boxes of $call exceed its limit" >&2; status=1; }
  done
  return $status
}
if [[ ${1:-} == --plan ]]; then plan; exit; fi
[[ $# -ge 2 ]] || { sed -n '2,26p' "$0"; exit 2; }
plan > /dev/null || exit 2
WHEELS=$(realpath -m "$1"); shift
OUT=${OUT:-/tmp/gpu_check}; SITE=${SITE:-/tmp/site}; WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
# the feed round's sizes (tests/test_tools.py shrinks them for its CPU dry run)
DEVICE=${DEVICE:-cuda}; FEED_CLASSES=${FEED_CLASSES:-1000}; FEED_TRAIN=${FEED_TRAIN:-50}; FEED_VAL=${FEED_VAL:-10}
WIDTH=${WIDTH:-1}; BATCH=${BATCH:-128}; STEPS=${STEPS:-100}; REPEATS=${REPEATS:-3}; EPOCHS=${EPOCHS:-3}
MAKERS=${MAKERS:-$(nproc)}; COMMIT=${COMMIT:-}
FEED=$WORK/feed_shards
quiet() { grep -v -E "nvjpeg2k|nvtiff|If using|UserWarning|warnings.warn" || true; }  # a filter: no lines is no failure
run() {  # run STAGE SECONDS COMMAND...: time-boxed, output to $OUT/STAGE.txt, last lines printed
  local stage=$1 limit=$2; shift 2
  echo "== $stage ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | quiet > "$OUT/$stage.txt"
  echo "   exit ${PIPESTATUS[0]}"; tail -n 25 "$OUT/$stage.txt"
}
boxed() {  # boxed CMD COMMAND...: the feed round's command CMD inside its box, its output to $OUT/CMD.txt;
  # prints how it ended, how long it took and its last lines
  local cmd=$1 t0=$SECONDS status; shift
  timeout "${BOX[$cmd]}" "$@" 2>&1 | quiet > "$OUT/$cmd.txt"; status=${PIPESTATUS[0]}
  echo "$cmd: exit $status after $((SECONDS - t0)) s of ${BOX[$cmd]}$( ((status == 124)) && echo ' (its box ran out)')"
  grep -E "^epoch [0-9]+/[0-9]+:|training|img/s|images/s|passed|failed|skipped|error|Error" "$OUT/$cmd.txt" | tail -n 12
  return "$status"
}
install() {
  $PY -c "import nvidia.dali" 2>/dev/null && return 0
  mkdir -p "$SITE"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  else  # the bundle holds site/...: every piece must be there (a machine gone cold between calls has lost them)
    local piece
    for piece in 0 1 2; do
      [[ -f $WHEELS/site.tar.xz.$piece ]] || { echo "install: $WHEELS/site.tar.xz.$piece is missing (the machine \
went cold between calls? carry every piece again)" >&2; return 1; }
    done
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
# ---- the feed round ----------------------------------------------------------------------------------------
feed_data() {  # call 1: the photo-like feed set on this machine's cores, then its shards
  local t0=$SECONDS t1
  rm -rf "$WORK/feed_sample" "$FEED"
  boxed make $PY tools/make_sample_imagenet.py --out "$WORK/feed_sample" --classes "$FEED_CLASSES" \
    --train-per-class "$FEED_TRAIN" --val-per-class "$FEED_VAL" --layouts extracted --workers "$MAKERS" || return 1
  t1=$SECONDS
  boxed prep $PY -m alexnet_pipeline prep --imagenet-root "$WORK/feed_sample/extracted" --out "$FEED" \
    --no-progress || return 1
  echo "{\"maker_s\": $((t1 - t0)), \"prep_s\": $((SECONDS - t1)), \"cores\": $(nproc)}" > "$WORK/feed_data.json"
  cp "$WORK/feed_data.json" "$OUT/feed_data.json"
  record  # the set's images and JPEG bytes per image
}
step() {  # call 2: the synthetic step alone (no DALI yet); also fills torch.compile's cache for call 3
  boxed step $PY tools/step_profile.py --device "$DEVICE" --variants +compile --batch-size "$BATCH" \
    --width "$WIDTH" --steps "$STEPS" --repeats "$REPEATS" --no-layers --record "$OUT/step.json"
}
record() {
  $PY tools/feed_record.py --shards "$FEED" --out "$OUT/h200_feed.json" --loader "$OUT/feed_loader.json" \
    --bench "$OUT/feed_bench.json" --train-log "$OUT/feed_train.jsonl" --two-ranks "$OUT/feed_two_ranks.txt" \
    --feed-data "$WORK/feed_data.json" ${COMMIT:+--commit "$COMMIT"}
}
feed() {  # call 3, most important first; the record is rewritten after every command
  [[ -f $FEED/dataset.json ]] || { echo "feed: no feed set at $FEED (the machine went cold? run call 1 again)" >&2
                                   return 1; }
  boxed install bash "$0" "$WHEELS" install || return 1
  local bench="$PY -m alexnet_pipeline bench"
  rm -rf "$WORK/feed_run"
  boxed train $PY -m alexnet_pipeline train --shards "$FEED" --out "$WORK/feed_run" --device "$DEVICE" \
    --width "$WIDTH" --global-batch "$BATCH" --epochs "$EPOCHS" --log-every 25 --no-final-tencrop
  cp "$WORK/feed_run/log.jsonl" "$OUT/feed_train.jsonl" 2>/dev/null; record
  boxed bench $bench train --shards "$FEED" --device "$DEVICE" --width "$WIDTH" --batch-size "$BATCH" \
    --steps "$STEPS" --repeats "$REPEATS" --feeds synthetic,dali --record "$OUT/feed_bench.json"; record
  boxed loader $bench loader --shards "$FEED" --device "$DEVICE" --batch-size "$BATCH" --steps "$((STEPS / 2))" \
    --repeats "$REPEATS" --axes hw_threads,batches_per_run,decoder,preallocate,stream_ordered \
    --record "$OUT/feed_loader.json"; record
  boxed two-ranks $PY -m pytest -q -p no:cacheprovider tests/test_train_gpu.py -k two_ranks
  cp "$OUT/two-ranks.txt" "$OUT/feed_two_ranks.txt"; record
}
failed=0
for stage in "$@"; do
  case $stage in
    install)  install 2>&1 | quiet | tail -3 ;;
    shards)   run shards 150 bash "$0" "$WHEELS" _shards ;;
    test)     run test 420 $PY -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py tests/test_train_gpu.py ;;
    train)    run train 300 $PY -m alexnet_pipeline bench train --shards "$WORK/shards" --device cuda --threads 14 \
                --steps 50 --repeats 5 --profile --compile \
                --feeds synthetic,dali,dali-cpu,dali-hw0,dali-hw0.5,dali-hw0.9,dali-hw1,dataloader ;;
    train-eager) run train-eager 200 $PY -m alexnet_pipeline bench train --shards "$WORK/shards" --device cuda \
                --threads 14 --steps 50 --repeats 5 --profile --no-compile --feeds synthetic,dali ;;
    pipeline) run pipeline 200 $PY -m alexnet_pipeline bench pipeline --shards "$WORK/shards" --device cuda \
                --dtype float16 --batch-size 256 --threads 14 --repeats 5 --steps 100 --no-baseline ;;
    trainer)  rm -rf "$WORK/run"; run trainer 240 $PY -m alexnet_pipeline train --shards "$WORK/shards" \
                --out "$WORK/run" --epochs 3 --log-every 5 --threads 14 --compile ;;
    learn)    run learn 540 bash "$0" "$WHEELS" _learn ;;
    feed-data) feed_data 2>&1 | quiet | tee "$OUT/feed-data.log"; failed+=$((PIPESTATUS[0] != 0)) ;;
    step)     step 2>&1 | quiet | tee "$OUT/step.log"; failed+=$((PIPESTATUS[0] != 0)) ;;
    feed)     feed 2>&1 | quiet | tee "$OUT/feed.log"; failed+=$((PIPESTATUS[0] != 0)) ;;
    _shards)  shards ;;  # the time-boxed bodies of shards and learn
    _learn)   learn ;;
    *)        echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
((failed == 0))
