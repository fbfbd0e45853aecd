"""Load one checkpoint in both twins and print how far apart their logits are.

    python scripts/compare_logits.py --weights tiny-dyt.safetensors
    python scripts/compare_logits.py --spec tiny-dyt          # a fresh numpy init, nothing written
"""

from __future__ import annotations


import numpy as np

from shared_config import init_weights, load_spec
from shared_config.cli import Parser, UsageError, at_least, nonempty, run
from shared_config.files import json_text
from shared_config.formats import quiet_libraries, read_checkpoint
from shared_config.parity import rel_err, top1_agreement
from shared_config.resources import check_memory, init_bytes, weights_bytes
from shared_config.twins import twin


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=nonempty,
                     help="a checkpoint in any format from_pretrained reads: a .safetensors or .pt file, a "
                                       "run's step directory, an Orbax, Hugging Face or "
                                       "flash-linear-attention directory")
    src.add_argument("--spec", type=nonempty, help="preset name or YAML path (weights from init_weights(spec, --seed))")
    # bounded at parse time: --batch 0 or -1 and --seed -1 were numpy tracebacks
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the init and the input tokens")
    p.add_argument("--batch", type=at_least(1), default=2, help="sequences per batch")
    p.add_argument("--seq", type=at_least(1), default=64, help="positions the model reads")
    args = p.parse_args(argv)
    if args.weights:
        quiet_libraries()
        weights, spec = read_checkpoint(args.weights)
    else:
        spec = load_spec(args.spec)
    if args.seq > spec.max_seq_len:
        raise UsageError(f"--seq {args.seq} must be in 1..max_seq_len={spec.max_seq_len}")
    # a lower bound, before anything is drawn or built: the weights in numpy and in each twin, and per logit both
    # twins' float32 and float64 copies and their difference
    check_memory(max(init_bytes(spec), 3 * weights_bytes(spec) + 32 * args.batch * args.seq * spec.V),
                 f"comparing {spec.L} layers of d_model {spec.D}, vocab {spec.V:,} at batch {args.batch:,} x seq "
                 f"{args.seq}", "lower --batch or --seq, or the model's sizes")
    if not args.weights:
        weights = init_weights(spec, args.seed)

    import jax.numpy as jnp
    import torch

    twin("jax", "precision").exact_float32()  # true float32 on every device
    twin("torch", "precision").exact_float32()
    tokens = np.random.default_rng(args.seed).integers(0, spec.V, (args.batch, args.seq))
    j = np.asarray(twin("jax").from_weights(weights, spec)(jnp.asarray(tokens)), np.float64)
    with torch.no_grad():
        t = twin("torch").from_weights(weights, spec)(torch.as_tensor(tokens)).double().numpy()
    result = {
        "spec": args.weights or args.spec, "seed": args.seed, "batch": args.batch, "seq": args.seq,  # seed: the tokens
        "logits_std": float(t.std()), "max_abs_diff": float(np.abs(j - t).max()),
        "max_abs_diff_over_std": rel_err(j, t),  # over max|t| where std is 0 (one logit: a NumPy warning and null)
        "same_argmax": top1_agreement(j, t),  # NaN (null) where a logit is NaN: two NaN twins "agreed" (1.0)
    }
    print(json_text(result, indent=2))


if __name__ == "__main__":
    run(main)
