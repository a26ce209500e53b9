#!/usr/bin/env bash
# The GPU checks and benchmarks, on a lent machine with a CUDA GPU and torch but no network and no DALI.
#
# The feed round: three device calls, one try, inside 13 minutes of device time (`--plan` prints the arithmetic).
# Here, once:   bash tools/gpu_bundle.sh gpu_bundle      # gpu_bundle/site.tar.xz.{0,1,2} + gpu_bundle/SHA256SUMS
#               bash tools/gpu_check.sh --plan           # the boxes below, checked against the call's limit
# Then, as device calls (each carries what it names; the machine keeps /tmp only while it stays warm, 30 s):
#   call 1  run(command="bash tools/gpu_check.sh carry 0",
#               carry=["gpu_bundle/site.tar.xz.0", "gpu_bundle/SHA256SUMS"], timeout_s=120)
#   call 2  run(command="bash tools/gpu_check.sh carry 1", carry=["gpu_bundle/site.tar.xz.1"], timeout_s=120)
#   call 3  run(command="COMMIT=<sha> bash tools/gpu_check.sh round", carry=["gpu_bundle/site.tar.xz.2"],
#               timeout_s=600)
#   then give_back. Calls 1 and 2 only copy their piece into /tmp/wheels (seconds). Call 3 checks every piece
#   (count and sha256; one line naming what is missing or damaged, exit 3, in seconds), installs DALI from
#   them (exit 4 if that fails), then runs each command inside its hard box (timeout -k): the feed set made and
#   prepped on the machine's cores beside the synthetic step (which fills torch.compile's cache, eval graph
#   included), alexnet-train's epochs, alexnet-bench train (synthetic against the default DALI feed), the
#   loader table (train rows first; then decoding alone and the CPU side), the two-ranks test, the GPU tests
#   (the pipeline against the CPU reference, the data-wait accounting). After every command it rewrites
#   $OUT/h200_feed.json (tools/feed_record.py, atomically) and $OUT/logs.tar.gz (every log and raw record);
#   $OUT never holds more than 8 files (the device returns 8), and the record is printed last, so the reply's
#   output tail carries it even if files were lost.
#
#   bash tools/gpu_check.sh WHEELS STAGE...   the other checks (not part of the round): install, shards, test,
#                                              train, train-eager, pipeline, trainer, learn; each to $OUT/STAGE.txt
#
# Sizes come from the environment, so that tests/test_tools.py runs the whole round on the CPU on tiny data,
# from a fake bundle and with an interpreter that lacks DALI (DEVICE=cpu FEED_CLASSES=... PY=...); the defaults
# are the GPU round's. BOX_SCALE multiplies every box when the round runs (not in --plan): the dry run's tiny
# commands on a 2-core CPU that the rest of the test suite keeps busy start slower than the GPU machine's.
set -uo pipefail
# ---- the plan (seconds) --------------------------------------------------------------------------------------
LIMIT=600        # call 3's timeout_s: the most a device command may run
GRACE=5          # timeout -k: a command that ignores SIGTERM is killed this long after its box
START=120        # a cold machine's start ("a minute or more"), counted as two
CARRY=30         # calls 1 and 2, each: sending the tree and a 56 MiB piece, copying it
BACK=30          # call 3's files coming back, and give_back
BUDGET=780       # 13 minutes of the 15 a session may hold a machine
PUBLISH=2        # after each command from the feed set on: the record (tools/feed_record.py) and the log archive
declare -A BOX=([check]=5 [install]=40 [data]=145 [step]=145 [train]=80 [bench]=55 [loader]=50 [ceiling]=15
                [two-ranks]=55 [gpu-test]=35)
# two-ranks: three torchrun launches of two ranks (train, resume, ten-crop eval); the same three on the CPU
# (--device cpu, the 407-image demo sample) took 22 s here; 55 s leaves each rank's CUDA start-up room.
PHASES=("check" "install" "data|step" "train" "bench" "loader" "ceiling" "two-ranks" "gpu-test")  # a|b: beside
plan() {
  local phase cmd longest used=0 status=0 publishes=0
  for phase in "${PHASES[@]}"; do
    longest=0
    for cmd in ${phase//|/ }; do ((BOX[$cmd] > longest)) && longest=${BOX[$cmd]}; done
    used=$((used + longest + GRACE))
    printf '  %-12s %3d s (+%d s to kill)\n' "$phase" "$longest" "$GRACE"
    [[ $phase == check || $phase == install ]] || publishes=$((publishes + 1))
  done
  used=$((used + publishes * PUBLISH))
  echo "  publish      $((publishes * PUBLISH)) s ($publishes records and log archives)"
  local allowed=$((LIMIT * 9 / 10)) round=$((START + 2 * CARRY + used + BACK))
  echo "call 3: $used s of boxes and grace, at most $allowed s (90% of its $LIMIT s limit)"
  echo "round: start $START + calls 1-2 $((2 * CARRY)) + call 3 $used + back $BACK = $round s of $BUDGET s"
  ((used <= allowed)) || { echo "  the boxes of call 3 exceed 90% of its limit" >&2; status=1; }
  ((round <= BUDGET)) || { echo "  the round exceeds its $BUDGET s" >&2; status=1; }
  return $status
}
if [[ ${1:-} == --plan ]]; then plan; exit; fi
plan > /dev/null || exit 2
[[ $# -ge 1 ]] || { sed -n '2,32p' "$0"; exit 2; }

OUT=${OUT:-/tmp/gpu_check}; SITE=${SITE:-/tmp/site}; WORK=${WORK:-/tmp/gpu_work}; WHEELS=${WHEELS:-/tmp/wheels}
BUNDLE=${BUNDLE:-gpu_bundle}
mkdir -p "$OUT" "$WORK/logs" "$WORK/raw"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
# the feed round's sizes (tests/test_tools.py shrinks them for its CPU dry run)
DEVICE=${DEVICE:-cuda}; FEED_CLASSES=${FEED_CLASSES:-1000}; FEED_TRAIN=${FEED_TRAIN:-50}; FEED_VAL=${FEED_VAL:-10}
WIDTH=${WIDTH:-1}; BATCH=${BATCH:-128}; STEPS=${STEPS:-100}; REPEATS=${REPEATS:-3}; EPOCHS=${EPOCHS:-3}
MAKERS=${MAKERS:-$(nproc)}; COMMIT=${COMMIT:-}
FEED=$WORK/feed_shards
quiet() { grep -v -E "nvjpeg2k|nvtiff|If using|UserWarning|warnings.warn" || true; }  # a filter: no lines is no failure

pieces() { awk '{print $2}' "$WHEELS/SHA256SUMS"; }
carry() {  # carry N: this call's piece into $WHEELS; the earlier ones must still be there
  local n=$1 k
  mkdir -p "$WHEELS"
  cp "$BUNDLE/site.tar.xz.$n" "$WHEELS/" || { echo "carry $n: $BUNDLE/site.tar.xz.$n was not carried" >&2; return 3; }
  [[ -f $BUNDLE/SHA256SUMS ]] && cp "$BUNDLE/SHA256SUMS" "$WHEELS/"
  for ((k = 0; k < n; k++)); do
    [[ -f $WHEELS/site.tar.xz.$k ]] || { echo "carry $n: piece $k is not on this machine (it went cold after call \
$((k + 1))); start again at call 1" >&2; return 3; }
  done
  echo "carried site.tar.xz.$n ($(stat -c %s "$WHEELS/site.tar.xz.$n") bytes)"
}
check() {  # every piece SHA256SUMS names, present and whole
  [[ -f $WHEELS/SHA256SUMS ]] || { echo "check: $WHEELS/SHA256SUMS is not on this machine (it went cold after call \
1, or call 1 did not carry it); start again at call 1" >&2; return 3; }
  local bad=() name
  for name in $(pieces); do
    [[ -f $WHEELS/$name ]] || { bad+=("$name (missing)"); continue; }
  done
  local damaged
  damaged=$(cd "$WHEELS" && sha256sum --quiet -c SHA256SUMS 2>/dev/null | grep -v "No such file" | cut -d: -f1)
  for name in $damaged; do [[ -f $WHEELS/$name ]] && bad+=("$name (sha256 differs)"); done
  ((${#bad[@]} == 0)) || { echo "check: ${bad[*]}: carry every piece again, from call 1" >&2; return 3; }
  echo "check: $(pieces | wc -l) pieces whole"
}
install() {
  $PY -c "import nvidia.dali" 2>/dev/null && return 0
  mkdir -p "$SITE"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || return 4
  else
    cat $(pieces | sed "s|^|$WHEELS/|") | xz -d -T0 | tar -x -C "$WORK" && cp -a "$WORK/site/." "$SITE/" || return 4
  fi
  $PY -c "import nvidia.dali as d, torch; print('DALI', d.__version__, 'torch', torch.__version__)" || return 4
}
boxed() {  # boxed NAME COMMAND...: NAME's box, hard; its output to $WORK/logs/NAME.txt; how it ended printed
  # (a function of this script runs as `bash THIS _fn FUNCTION`: timeout runs programs, not functions)
  local name=$1 t0=$SECONDS status box=$((${BOX[$1]} * ${BOX_SCALE:-1})); shift
  timeout -k "$GRACE" "$box" "$@" > "$WORK/logs/$name.txt" 2>&1; status=$?
  echo "$name: exit $status after $((SECONDS - t0)) s of $box$( ((status == 124 || status == 137)) && echo \
' (its box ran out)')"
  quiet < "$WORK/logs/$name.txt" | grep -E "^epoch [0-9]+/[0-9]+:|images/s|img/s|passed|failed|skipped|rror" | tail -n 6
  return "$status"
}
feed_data() {  # the photo-like feed set on this machine's cores, then its shards
  local t0=$SECONDS t1
  rm -rf "$WORK/feed_sample" "$FEED"
  $PY tools/make_sample_imagenet.py --out "$WORK/feed_sample" --classes "$FEED_CLASSES" --train-per-class "$FEED_TRAIN" \
    --val-per-class "$FEED_VAL" --layouts extracted --workers "$MAKERS" || return 1
  t1=$SECONDS
  $PY -m alexnet_pipeline prep --imagenet-root "$WORK/feed_sample/extracted" --out "$FEED" --no-progress || return 1
  echo "{\"maker_s\": $((t1 - t0)), \"prep_s\": $((SECONDS - t1)), \"cores\": $(nproc)}" > "$WORK/raw/feed_data.json"
}
publish() {  # the record and the logs into $OUT, each written whole (a copy, then a rename)
  $PY tools/feed_record.py --shards "$FEED" --out "$OUT/.h200_feed.json" --loader "$WORK/raw/loader.json" \
    --ceiling "$WORK/raw/ceiling.json" --bench "$WORK/raw/bench.json" --train-log "$WORK/feed_run/log.jsonl" \
    --step "$WORK/raw/step.json" --two-ranks "$WORK/logs/two-ranks.txt" --gpu-tests "$WORK/logs/gpu-test.txt" \
    --feed-data "$WORK/raw/feed_data.json" ${COMMIT:+--commit "$COMMIT"} > /dev/null \
    && mv "$OUT/.h200_feed.json" "$OUT/h200_feed.json"
  tar -czf "$OUT/.logs.tar.gz" -C "$WORK" logs raw && mv "$OUT/.logs.tar.gz" "$OUT/logs.tar.gz"
  local n; n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  ((n <= 8)) || echo "publish: $n files under \$OUT; the device returns 8" >&2
}
round() {  # exits 3 (pieces) or 4 (install) at once; else runs every box, then 1 if any failed
  local failed=0
  if [[ -f $WHEELS/SHA256SUMS ]]; then  # this call's piece is the last; the earlier ones must be here already
    carry "$(($(pieces | wc -l) - 1))" > /dev/null || return 3
  fi
  boxed check bash "$0" _fn check || { cat "$WORK/logs/check.txt" >&2; return 3; }
  boxed install bash "$0" _fn install || { tail -n 5 "$WORK/logs/install.txt" >&2; return 4; }
  local bench="$PY -m alexnet_pipeline bench"
  # the feed set on the CPUs beside the synthetic step on the GPU (which also compiles the train and eval graphs
  # into torch.compile's cache for alexnet-train and the bench)
  boxed data bash "$0" _fn feed_data & local data=$!
  boxed step $PY tools/step_profile.py --device "$DEVICE" --variants +compile --batch-size "$BATCH" --width "$WIDTH" \
    --steps "$STEPS" --repeats "$REPEATS" --no-layers --eval-graph --record "$WORK/raw/step.json" || failed=1
  wait "$data" || failed=1; publish
  [[ -f $FEED/dataset.json ]] || { echo "round: no feed set (see logs/data.txt); the rest needs it" >&2; return 1; }
  rm -rf "$WORK/feed_run"
  boxed train $PY -m alexnet_pipeline train --shards "$FEED" --out "$WORK/feed_run" --device "$DEVICE" \
    --width "$WIDTH" --global-batch "$BATCH" --epochs "$EPOCHS" --log-every 25 --no-final-tencrop || failed=1; publish
  boxed bench $bench train --shards "$FEED" --device "$DEVICE" --width "$WIDTH" --batch-size "$BATCH" \
    --steps "$STEPS" --repeats "$REPEATS" --feeds synthetic,dali --record "$WORK/raw/bench.json" || failed=1; publish
  boxed loader $bench loader --shards "$FEED" --device "$DEVICE" --batch-size "$BATCH" --steps "$((STEPS / 2))" \
    --repeats "$REPEATS" --what train --axes hw_threads,batches_per_run,decoder,crop_decode,preallocate,stream_ordered \
    --record "$WORK/raw/loader.json" || failed=1; publish
  boxed ceiling $bench loader --shards "$FEED" --device "$DEVICE" --batch-size "$BATCH" --steps "$((STEPS / 2))" \
    --repeats "$REPEATS" --what decode,read --axes "" --record "$WORK/raw/ceiling.json" || failed=1; publish
  boxed two-ranks $PY -m pytest -q -p no:cacheprovider tests/test_train_gpu.py -k two_ranks || failed=1; publish
  boxed gpu-test $PY -m pytest -q -p no:cacheprovider tests/test_pipeline_gpu.py \
    "tests/test_train_gpu.py::test_the_data_wait_is_the_gpus_idle_time_between_steps_not_the_hosts_time_in_next" \
    || failed=1
  publish
  cat "$OUT/h200_feed.json"
  return $failed
}
# ---- the other checks (not part of the feed round) ------------------------------------------------------------
run() {  # run STAGE SECONDS COMMAND...: time-boxed, output to $OUT/STAGE.txt, last lines printed
  local stage=$1 limit=$2; shift 2
  echo "== $stage ($(date +%T))"
  timeout -k "$GRACE" "$limit" "$@" 2>&1 | quiet > "$OUT/$stage.txt"
  echo "   exit ${PIPESTATUS[0]}"; tail -n 25 "$OUT/$stage.txt"
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
case ${1:-} in
  carry) carry "${2:?carry N}"; exit ;;
  round) round; exit ;;
  _fn)   "$2"; exit ;;  # a function of this script, run by `boxed` inside its box
esac
WHEELS=$(realpath -m "$1"); shift
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
    _shards)  shards ;;  # the time-boxed bodies of shards and learn
    _learn)   learn ;;
    *)        echo "unknown stage $stage" >&2; exit 2 ;;
  esac || failed=1
done
exit $failed
