#!/usr/bin/env bash
# GPU check of the scoring throughput benchmark (issues 4 and 12): CUDA, bf16, a Qwen3-0.6B-shaped
# model with random weights (hidden 1024, 28 layers, 16 query / 8 kv heads, head_dim 128,
# intermediate 3072, 151936 logits). Prints tokens/s, FLOP/s and MFU against a bf16 matmul
# peak measured in the same run, for (d) the body-only forward (the reference line),
# (c) score_batch with ifd=false, (c+ifd) the same with IFD's second forward (its extra time
# printed separately), (b) the naive padded loop and (a) the Ray Data job (one GPU actor,
# ifd=false; its fixed cost and the ratios a/b, a/c, a/d, c/d); see bench/score_throughput.py
# for what each times.
#
#   bash bench/gpu_check.sh                 # N=6000 samples: about 3-4 minutes on one H100/H200 (est.)
#   N=3000 bash bench/gpu_check.sh          # shorter
#   METHODS=c,d bash bench/gpu_check.sh     # only the score_batch / body-only ratio
#
# Expects one CUDA GPU and a python (PYTHON, default `python`) that can import torch (CUDA
# build), transformers, tokenizers, ray[data], pyarrow, psutil and yaml: qgate's
# dependencies. It installs nothing and needs no network: model and tokenizer are built
# locally. qgate itself comes from `pip install -e .` or, failing that, from PYTHONPATH,
# which this script points at the repository root. The tokenizer is the small BPE one
# trained on the synthetic corpus (8192 tokens); the model keeps Qwen3's 151936-row
# embedding / lm_head, so every forward pays for the real vocabulary (ids >= 8192 are
# never looked up). The driver-cost test is CPU-side and skipped here (--skip-memory).
# The output also goes to $OUT/gpu_check.txt when OUT is set. A hard TIMEOUT (default
# 290 s, for the benchmark itself) keeps the whole run under 5 minutes; partial results are
# printed as they come (the loop rows first, then the Ray Data job).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY="${PYTHON:-python}"
N="${N:-6000}"
METHODS="${METHODS:-a,b,c,c+ifd,d}"
TIMEOUT="${TIMEOUT:-290}"
LOG=/dev/null
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check.txt"
fi

{
  echo "== bench/gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), N=$N METHODS=$METHODS TIMEOUT=${TIMEOUT}s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "(nvidia-smi not available)"
  "$PY" - <<'EOF'
import importlib, sys

missing = []
for mod in ("torch", "transformers", "tokenizers", "ray.data", "pyarrow", "psutil", "yaml", "qgate"):
    try:
        importlib.import_module(mod)
    except ImportError as e:
        missing.append(f"{mod} ({e})")
if missing:
    sys.exit("gpu_check: cannot import " + ", ".join(missing)
             + ": install qgate's dependencies (pip install -e .) on this machine first")
import torch, transformers, ray

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"python {sys.version.split()[0]} torch {torch.__version__} (CUDA {torch.version.cuda}) "
      f"transformers {transformers.__version__} ray {ray.__version__} "
      f"gpu {torch.cuda.get_device_name(0)}")
EOF
  timeout --signal=INT --kill-after=10 "$TIMEOUT" "$PY" bench/score_throughput.py \
    --device cuda --dtypes bfloat16 --methods "$METHODS" --n "$N" \
    --hidden 1024 --layers 28 --heads 16 --kv-heads 8 --head-dim 128 --intermediate 3072 \
    --vocab 8192 --model-vocab 151936 \
    --baseline-rows 16 --batch-rows 1024 --batch-tokens 65536 --rows-per-shard 1000 \
    --actors 1x1 --peak-size 8192 --skip-memory
} 2>&1 | tee "$LOG"
