#!/usr/bin/env bash
# The real-shape bench on one GPU: the whole Qwen2.5-0.5B body (24 layers, vocabulary 151,936, random
# weights), bf16, DPO vs TRL 1.16 (live and precomputed reference), SFT vs SFTTrainer, sampling vs
# generate, each contender in its own process, and what fits (two batch sizes, extrapolated).
# Usage: bench/gpu-vocab.sh OUT_DIR [BATCH] [LAYERS]   (LAYERS 0 = the whole body)
# Where dpoflow's dependencies are not installed, wheels in .whl/ are put on the path first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench} batch=${2:-8} layers=${3:-0}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())"
PYTHONUNBUFFERED=1 python3 - "$out" "$batch" "$layers" <<'PY'
import sys

from dpoflow_bench.vocab import run_vocab

out, batch, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
precision = "bf16" if __import__("torch").cuda.is_available() else "fp32"
report = run_vocab(out, shape="qwen2.5-0.5b", layers=layers, vocabularies=(151936,), batch=batch, lengths=(64, 400),
                   steps=3, precision=precision, name=f"vocab-gpu-{precision}")
print(open(f"{out}/vocab-gpu-{precision}.md").read())
PY
