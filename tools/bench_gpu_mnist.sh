#!/usr/bin/env bash
# The GPU benchmark of the one- and few-step MNIST students (issue 11), in one device call:
#   1. the MNIST-5k FID reference, computed once before the runs read it from the cache;
#   2. SiD, f-distill JS, DMD2, consistency and progressive distillation (configs/mnist, batch 128)
#      x the seeds in $SEEDS, all side by side on one GPU (one process and one CPU thread each), each
#      within BUDGET_MIN minutes of training time, FID-1k every 500 updates; with ABLATIONS=1 also, on
#      seed 0, progressive with the teacher's epsilon output and consistency with v-prediction;
#   3. the trained students (seed 0) and every run's logs, evaluations and sample grids packed into
#      OUT (before scoring, so that they come back even if scoring runs out of time);
#   4. FID-5k, precision/recall, class accuracy, classifier FD and near-black share of every student
#      and of the teacher at 1, 2, 4 and 50 DDIM steps (tools/bench_objectives.py score), packed into OUT.
#
#   tools/bench_gpu_mnist.sh RUNS OUT BUDGET_MIN [INCEPTION_WEIGHTS]
#
# BENCHMARKS.md section 6.1 ran it (as of 2026-12-04, when progressive.yaml still started at 8 steps with
# an epsilon student, so those runs passed objective.start_steps=32 and student.parameterization=v_prediction,
# which the config now holds) with BUDGET_MIN 4.5 on an H200.
#
# Environment: SEEDS (default "0 1 2"), ABLATIONS (default 1), NUM (images per scored entry, default
# 5000), SCORE_LIMIT_S (seconds allowed for step 4, default 200), EVAL_METRICS (during training, default
# "fid classifier_fd class_accuracy near_black"), PYTHON (default python3).
set -u
runs=$1; out=$2; budget=$3; weights=${4:-}
seeds=${SEEDS:-0 1 2}; num=${NUM:-5000}; py=${PYTHON:-python3}
wopt=(); [ -n "$weights" ] && wopt=(--weights "$weights")
mkdir -p "$runs" "$out"
t0=$(date +%s)
. "$(dirname "$0")/bench_common.sh"

stamp "reference statistics"
reference_statistics "$weights" || exit 1

common=(--budget-min "$budget" --eval-every 500 --eval-metrics ${EVAL_METRICS:-fid classifier_fd class_accuracy near_black} "${wopt[@]}"
        --threads 1 --set train.batch_size=128)
stamp "training (budget $budget min per method)"
for s in $seeds; do
  $py tools/bench_objectives.py train --runs "$runs/s$s" --only sid fdistill-js dmd2 consistency "${common[@]}" --set train.seed=$s > "$runs/train-s$s.log" 2>&1 &
  $py tools/bench_objectives.py train --runs "$runs/s$s" --only progressive "${common[@]}" --set train.seed=$s > "$runs/train-pd-s$s.log" 2>&1 &
done
if [ "${ABLATIONS:-1}" = 1 ]; then
  $py tools/bench_objectives.py train --runs "$runs/ablation-pd-eps" --only progressive "${common[@]}" --set student.parameterization=epsilon > "$runs/train-ablation-pd-eps.log" 2>&1 &
  $py tools/bench_objectives.py train --runs "$runs/ablation-cd-v" --only consistency "${common[@]}" --set student.parameterization=v_prediction > "$runs/train-ablation-cd-v.log" 2>&1 &
fi
wait
stamp "training done"; tail -n 3 "$runs"/train-*.log

# logs, evaluations, configs and grids of every run; the students of seed 0 (a few MB each), in parts of 15 MB
pack_run_records "$runs" "$out"
first=${seeds%% *}
(cd "$runs" && find "s$first" -path '*/checkpoints' -prune -o -type d -name student -print | tar cf - -T - | split -b 15m - "$out/students-s$first.tar.part-")
stamp "packed: $(ls "$out" | tr '\n' ' ')"

stamp "scoring (N = $num)"
score=(timeout "${SCORE_LIMIT_S:-200}" env OMP_NUM_THREADS=3 $py tools/bench_objectives.py score --num "$num" "${wopt[@]}")
"${score[@]}" --runs "$runs/s$first" --what teacher --teacher-steps 1 2 4 50 --teacher-w --out "$runs/results/teacher" > "$runs/score-teacher.log" 2>&1 &
for s in $seeds; do
  "${score[@]}" --runs "$runs/s$s" --what students --out "$runs/results/s$s" > "$runs/score-s$s.log" 2>&1 &
done
for a in ablation-pd-eps ablation-cd-v; do
  [ -d "$runs/$a" ] && "${score[@]}" --runs "$runs/$a" --what students --out "$runs/results/$a" > "$runs/score-$a.log" 2>&1 &
done
wait
stamp "scoring done"; tail -n 2 "$runs"/score-*.log
(cd "$runs" && tar czf "$out/results.tar.gz" results score-*.log)
stamp "all done: $(ls "$out" | tr '\n' ' ')"
