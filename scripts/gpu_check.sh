#!/usr/bin/env bash
# The GPU check of the aggregation layer, as one script (a lent GPU machine has torch, peft, pytest, hypothesis
# and scipy, but not this project's data packages or Flower, so it runs the aggregation tests, not the simulator's):
#   0. wheels in ./.whl (if that folder exists) are installed into /tmp/site first (a device machine has no network);
#   1. the aggregation tests with a CUDA device present: tests/test_aggregation_device.py runs every rule with its
#      uploads on CUDA against the CPU's results, and on CUDA every rule takes the batched path (issue 30), so the
#      whole suite checks the batched code there; tests/test_batched_aggregation.py checks batched against
#      per-client on CPU float64 (hypothesis);
#   2. benchmarks/bench_aggregation.py --batched --syncs on the GPU: batched vs today's per-client vs the dense
#      formation of ΔW* at U = 10, 100, 1000 on the LLaMA-7B shape (4096², r = 8), same run, with the solvers'
#      host-synchronisation counts (torch.cuda.set_sync_debug_mode);
#   3. only with RUN_SCALE=1: benchmarks/bench_aggregation.py --scale on the GPU (the earlier cross-device table);
#   4. benchmarks/bench_together.py --shapes on the GPU: simulator throughput with the clients trained together vs one
#      after another, MiniLM and SmolLM2 architectures (random weights and tokens: no model or data packages needed)
#      at 10 and 100 clients per round (target: ≥ 5× for MiniLM at 100), then peak memory of 100 clients vs 2 with
#      groups of 2 and of 32 (TOGETHER=0 skips this part).
# Usage: OUT=/some/dir bash scripts/gpu_check.sh    (writes tests.log, batched-cuda.md, syncs, scale-*.md, together-*.md there)
# Sizes: BATCHED_CLIENTS (default "10 100 1000"), SHAPE (4096), RANK (8), REPEATS (3).
set -uo pipefail
OUT=${OUT:-/tmp/fedlora-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "warning: the wheels in .whl did not install" >&2
fi
export PYTHONPATH=src:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -x \
  tests/test_aggregation_device.py tests/test_batched_aggregation.py tests/test_large_u.py tests/test_aggregation.py \
  tests/test_aggregation_properties.py tests/test_aggregation_extremes.py tests/test_mixed_ranks_math.py \
  2>&1 | tee "$OUT/tests.log" | tail -4
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_aggregation.py --batched --syncs --device cuda \
  --batched-clients ${BATCHED_CLIENTS:-10 100 1000} --shape "${SHAPE:-4096}" --rank "${RANK:-8}" --repeats "${REPEATS:-3}" \
  2>"$OUT/batched-cuda.err" | tee "$OUT/batched-cuda.md"
if [ "${RUN_SCALE:-0}" = 1 ]; then
  timeout "${SCALE_TIMEOUT:-240}" python3 benchmarks/bench_aggregation.py --scale --device cuda --repeats 3 \
    --scale-layers-1000 "${LAYERS_1000:-16}" 2>"$OUT/scale-cuda.err" | tee "$OUT/scale-cuda.md"
fi
if [ "${TOGETHER:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout "${TOGETHER_TIMEOUT:-240}" python3 benchmarks/bench_together.py --shapes --device cuda --models minilm \
    --clients ${TOGETHER_CLIENTS:-10 100} --repeats 2 2>"$OUT/together-cuda.err" | tee "$OUT/together-cuda.md"
  # shellcheck disable=SC2086
  timeout "${TOGETHER_TIMEOUT:-240}" python3 benchmarks/bench_together.py --shapes --device cuda --models smollm2 --group "${SMOL_GROUP:-8}" \
    --clients ${TOGETHER_CLIENTS:-10 100} --repeats 1 2>"$OUT/together-smollm2-cuda.err" | tee "$OUT/together-smollm2-cuda.md"
  for group in 2 32; do
    timeout 180 python3 benchmarks/bench_together.py --shapes --device cuda --memory --models minilm --clients 2 100 --group "$group" \
      2>>"$OUT/together-memory-cuda.err" | tee -a "$OUT/together-memory-cuda.md"
  done
fi
