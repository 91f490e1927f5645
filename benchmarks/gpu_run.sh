#!/usr/bin/env bash
# What a session runs on a lent GPU machine (the workplace's `device` tool), in steps that fit its
# 10-minute calls. The machine has torch and most dependencies but no registry, so the missing
# wheels travel in .whl/ (see benchmarks/RESULTS.md, "GPU") and are installed into .whl/site;
# logs and JSON go to $OUT (the device tool's folder; gpu_out/ elsewhere).
#
#   bash benchmarks/gpu_run.sh cuda-tests verdict   # steps run in order; each has its own timeout
#   cuda-tests: tests/test_cuda.py and the other CUDA tests     suite: the whole suite (-n 8)
#   verdict: bench_verdict.py --device cuda (extra arguments in VERDICT_ARGS)
#   ipr: bench_ipr.py --device cuda (extra arguments in IPR_ARGS, e.g. "--workload resnet50_224")
#   distributed: bench_distributed.py --device cuda, 1 rank per visible GPU (RANKS, e.g. "1,2,4,8"; one GPU:
#     "1": the sharded path's overhead against the plain process) and tests/test_distributed*.py
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"

export PYTHONPATH=$PWD/.whl/site
if ! python3 -c "import pytest_saliency.plugin, captum" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi

for step in "${@:-cuda-tests}"; do
  case "$step" in
    cuda-tests)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, captum; print('torch', torch.__version__, 'captum', captum.__version__, 'cuda', torch.cuda.is_available())"
      timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_devices.py \
        tests/test_metrics.py::test_cuda_matches_cpu tests/test_similarity.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
      ;;
    suite)
      # Two threads per worker: 8 workers of torch's default 16 threads each crawl on 16 cores.
      OMP_NUM_THREADS=2 timeout "${SUITE_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -n 8 2>&1 | tee "$OUT/suite.log" | tail -25
      ;;
    verdict)
      timeout "${VERDICT_TIMEOUT:-540}" python3 benchmarks/bench_verdict.py --device cuda \
        --json "$OUT/results_verdict_cuda.json" ${VERDICT_ARGS:-} 2>&1 | tee "$OUT/verdict.log"
      ;;
    ipr)
      timeout "${IPR_TIMEOUT:-540}" python3 benchmarks/bench_ipr.py --device cuda ${IPR_ARGS:-} \
        --json "$OUT/results_ipr_cuda.json" 2>&1 | tee "$OUT/ipr.log" | tail -80
      ;;
    distributed)
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_distributed_units.py \
        2>&1 | tee "$OUT/distributed_tests.log" | tail -5
      timeout "${DISTRIBUTED_TIMEOUT:-420}" python3 benchmarks/bench_distributed.py --device cuda \
        --ranks "${RANKS:-1}" --images 1024 --size 64 --shard-size 64 --repeats 3 \
        --json "$OUT/results_distributed_cuda.json" 2>&1 | tee "$OUT/distributed.log" | tail -30
      ;;
    *)
      echo "unknown step $step: use cuda-tests, suite, verdict, ipr or distributed" >&2
      exit 2
      ;;
  esac
done
