"""Cross-check of the flash-linear-attention conversion against the fla package itself (not collected by pytest).

The suite checks `convert.py --to fla` and fla imports against fla's documented layout, on directories the tests
write: the package needs Triton even to import, too heavy for CI. Run this by hand where fla is installed:

    python -m venv --system-site-packages /tmp/flaenv
    /tmp/flaenv/bin/pip install flash-linear-attention fla-core triton einops
    /tmp/flaenv/bin/python -m parity_tests.external.fla_package

For each spec below it writes our weights with `write_fla`, builds fla's `GLAForCausalLM` from that config.json,
loads the tensors (every key matched, `lm_head` tied where the spec ties it), and compares fla's logits [B, T, V]
with the torch twin's and both with the float64 reference (max|Δ| / std). Then fla's own `save_pretrained` (its
config.json with every default it writes) is read back by `read_fla`: the same spec and bit-identical weights.

It runs on the CPU, on any machine: fla's Triton kernels are replaced by fla's own reference code where it has one
(`naive_recurrent_gla` for the GLA kernels, `rotary_embedding_ref` for RoPE) and by torch's for the rest (RMSNorm,
SiLU, SwiGLU, causal attention for flash-attn), and the model is built with `fuse_norm=False` (its output norm is
then `attn.g_norm`, the same weight as `attn.g_norm_swish_gate`). What is checked is the mapping and fla's model
code around its kernels; the kernels' own distance on a GPU is bench/gla_layer.py's. Exit status 1 if any check
fails, 2 without fla.
Last run (2026-12-07, fla 0.6.0, torch 2.13 CPU): docs/gla.md, "Conversion".
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from parity_tests.support import reference
from parity_tests.support.common import make_spec, parity_weights
from shared_config.formats.fla import read_fla, write_fla
from shared_config.parity import FLOOR_FACTOR, FORWARD_TOL, rel_err

GLA = dict(mixer="gla", position="none", n_kv_heads=None, n_heads=2, gla_expand_k=0.5, gla_gate_rank=16,
           gla_gate_normalizer=16.0, gla_output_norm="rms", tie_embeddings=True)
SPECS = {  # fla computes a gate of rank 16 with normalizer 16 and an RMS output norm (shared_config.formats.fla)
    "gla": GLA,
    "gla wide heads, untied, eps 1e-5": {**GLA, "n_heads": 4, "gla_expand_k": 1.0, "gla_expand_v": 2.0,
                                         "tie_embeddings": False, "norm_eps": 1e-5},
    "the same, eps 1e-6 (fla's default)": {**GLA, "n_heads": 4, "gla_expand_k": 1.0, "gla_expand_v": 2.0,
                                           "tie_embeddings": False, "norm_eps": 1e-6},
    "hybrid 1 in 2, grouped keys": {**GLA, "n_layers": 4, "n_heads": 4, "n_kv_heads": 1, "gla_attention_every": 2,
                                    "position": "rope"},
    "hybrid 1 in 3, theta 5e5, untied": {**GLA, "n_layers": 6, "n_heads": 4, "n_kv_heads": 2,
                                         "gla_attention_every": 3, "position": "rope", "rope_theta": 500000.0,
                                         "tie_embeddings": False},
}


def cpu_stand_ins() -> None:
    """Replace fla's Triton kernels with fla's reference code and torch's (this module's docstring)."""
    import fla.layers.attn as fla_attn
    import fla.layers.gla as fla_gla
    import fla.modules.activations as fla_activations
    import fla.modules.mlp as fla_mlp
    import fla.modules.rotary.ops as fla_rotary
    from fla.ops.gla.naive import naive_recurrent_gla

    def gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, **_):
        return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)

    class RMSNorm(torch.nn.RMSNorm):
        def __init__(self, hidden_size, elementwise_affine=True, eps=1e-5, dtype=None, **_):
            super().__init__(hidden_size, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype)

        def forward(self, x):
            return super().forward(x.float()).to(x.dtype)

    def rope(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, chunk_indices=None):
        assert isinstance(seqlen_offsets, int) and cu_seqlens is None
        t = slice(seqlen_offsets, seqlen_offsets + x.shape[1])
        return fla_rotary.rotary_embedding_ref(x, cos[t], sin[t], interleaved)

    def attention(q, k, v, causal=True, window_size=(-1, -1)):  # [B, T, H, E]; query head h reads kv head h // G
        assert causal and window_size == (-1, -1)
        k, v = (x.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for x in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
        return o.transpose(1, 2)

    fla_gla.chunk_gla = fla_gla.fused_recurrent_gla = gla
    fla_gla.RMSNorm = RMSNorm
    for name in ("swish", "silu"):
        fla_activations.ACT2FN[name] = torch.nn.functional.silu
    fla_mlp.swiglu = lambda x, y: torch.nn.functional.silu(x) * y
    fla_rotary.rotary_embedding = rope
    fla_attn.flash_attn_func = attention


def check(label: str, changes: dict, tmp: Path) -> list[str]:
    """One spec's checks; returns the failures."""
    import json

    from fla.models import GLAConfig, GLAForCausalLM
    from safetensors.torch import load_file

    import torch_model

    spec = make_spec(**changes)
    weights = parity_weights(spec)
    write_fla(tmp / "ours", weights, spec)
    config = json.loads((tmp / "ours" / "config.json").read_text())
    tensors = load_file(tmp / "ours" / "model.safetensors")
    unfused = dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)  # torch's modules, not Triton's
    model = GLAForCausalLM(GLAConfig(**{**config, **unfused})).float().eval()
    named = {k.replace("g_norm_swish_gate", "g_norm"): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(named, strict=False)
    failures = [f"{label}: fla's model lacks {unexpected} and has no {missing} in our file"
                for _ in [0] if unexpected or set(missing) - ({"lm_head.weight"} if spec.tie_embeddings else set())]
    if spec.tie_embeddings and model.lm_head.weight.data_ptr() != model.model.embeddings.weight.data_ptr():
        failures.append(f"{label}: fla did not tie lm_head to the embeddings")
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 100))
    signs = np.random.default_rng(1)
    nudged = {k: (w.astype(np.float64) * (1 + 2.0**-24 * signs.choice([-1.0, 1.0], w.shape))).astype(w.dtype)
              for k, w in weights.items()}
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens)).logits.double().numpy()
        ours, floor = (torch_model.from_weights(w, spec)(torch.from_numpy(tokens)).double().numpy()
                       for w in (weights, nudged))
    exact = reference.forward({k: np.asarray(v, np.float64) for k, v in weights.items()}, spec, tokens)
    exact = exact[0] if isinstance(exact, tuple) else exact
    # the bound: FORWARD_TOL, or more where the logits are ill-conditioned (parity_report's rounding floor: how far
    # ours move when every weight is rounded once more)
    bound = max(FORWARD_TOL, FLOOR_FACTOR * rel_err(floor, ours))
    errs = rel_err(theirs, ours), rel_err(theirs, exact), rel_err(ours, exact)
    if errs[0] > bound:
        failures.append(f"{label}: fla's logits {errs[0]:.1e} from ours (bound {bound:.1e})")

    saved = GLAForCausalLM(GLAConfig(**config))  # fla's own names, written by its own save_pretrained
    saved.load_state_dict(tensors, strict=not spec.tie_embeddings)
    saved.save_pretrained(tmp / "theirs")
    back, back_spec = read_fla(tmp / "theirs")
    same = back_spec == spec and all(np.array_equal(back[k], weights[k]) for k in weights)
    print(f"| {label} | {errs[0]:.1e} | {bound:.1e} | {errs[1]:.1e} | {errs[2]:.1e} | {'yes' if same else 'NO'} |",
          flush=True)
    if not same:
        failures.append(f"{label}: read_fla of fla's save_pretrained gave another spec or other weights")
    return failures


def main() -> int:
    try:
        import fla
    except ImportError as e:  # a bare ModuleNotFoundError traceback before
        print(f"error: this check needs flash-linear-attention ({e}); install it as this module's docstring says",
              file=sys.stderr)
        return 2

    print(f"fla {fla.__version__}, torch {torch.__version__}, CPU")
    cpu_stand_ins()
    print("| spec | fla vs ours | bound | fla vs float64 | ours vs float64 | fla's own save read back bit-exact |")
    print("|---|---|---|---|---|---|")
    failures = []
    for label, changes in SPECS.items():
        with tempfile.TemporaryDirectory() as tmp:
            failures += check(label, changes, Path(tmp))
    for line in failures:
        print("FAIL:", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
