#!/usr/bin/env bash
# The GPU check of the aggregation layer, as one script (a lent GPU machine has torch, peft, pytest, hypothesis
# and scipy, but not this project's data packages or Flower, so it runs the aggregation tests, not the simulator's):
#   1. the aggregation tests with a CUDA device present (tests/test_aggregation_device.py then also runs every rule
#      with its uploads on CUDA, against the CPU's results);
#   2. benchmarks/bench_aggregation.py --scale on the GPU (uploads on CUDA; every ratio is to the dense formation of
#      ΔW* on the same GPU in the same run).
# Usage: OUT=/some/dir bash scripts/gpu_check.sh    (writes tests.log and scale-*.md there)
set -uo pipefail
OUT=${OUT:-/tmp/fedlora-gpu}
mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_aggregation_device.py tests/test_large_u.py tests/test_aggregation.py tests/test_aggregation_properties.py \
  tests/test_aggregation_extremes.py tests/test_mixed_ranks_math.py 2>&1 | tee "$OUT/tests.log" | tail -4
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_aggregation.py --scale --device cuda --repeats 3 \
  --scale-layers-1000 "${LAYERS_1000:-16}" 2>"$OUT/scale-cuda.err" | tee "$OUT/scale-cuda.md"
