#!/usr/bin/env bash
# The bench on a TPU host in one command: the JAX twin, then the torch twin through torch_xla, each in its own
# process (JAX and PyTorch/XLA cannot share the chips in one), then their step-time ratio. README "Bench" → "TPU".
#   bash bench/tpu_check.sh                                  # llama-1b, bf16, batch 4 x seq 2048, train step
#   bash bench/tpu_check.sh --spec small --batch-size 8      # any compare.py option, after the defaults
# Results: bench/results/tpu-jax.json and tpu-torch.json (OUT=dir to change; PYTHON=interpreter). Exit status:
# the first failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
python=${PYTHON:-python}
defaults=(--spec llama-1b --compute-dtype bfloat16 --seq-len 2048 --batch-size 4)
"$python" bench/compare.py --backend jax "${defaults[@]}" "$@" --json "$out/tpu-jax.json"
"$python" bench/compare.py --backend torch "${defaults[@]}" "$@" --json "$out/tpu-torch.json"
"$python" - "$out/tpu-jax.json" "$out/tpu-torch.json" <<'EOF'
import json, sys

jax, torch = ({r["variant"]: r["step_s"]["median"] for r in json.load(open(p))["results"]} for p in sys.argv[1:])
print("step-time ratio (lower is faster): " + "; ".join(f"{v}: jax/torch {jax[v] / torch[v]:.2f}" for v in jax if v in torch))
EOF
