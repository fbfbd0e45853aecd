"""Values at their extremes (docs/checkpoints.md, "Bad input, limits and failures"): zero and empty are values,
never "not given"; a float64 past float32's range is refused without a warning; GLA's forget gates at the ends
of their range keep the recurrence's values."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from safetensors.numpy import save_file

import shared_config.formats.safetensors
from shared_config import CheckpointError

from ..support.common import bench_module, load_script, make_spec, one_line, quick_first, run_script

convert = load_script("convert").convert


def test_a_float64_past_float32s_range_is_refused_without_a_warning(tmp_path, canonical):
    weights, _ = shared_config.formats.safetensors.read_safetensors(canonical)
    weights = {k: v.astype(np.float64) for k, v in weights.items()}
    weights["model.norm.weight"][0] = 1e300
    src = tmp_path / "f64.safetensors"
    save_file(weights, src, metadata={"spec": make_spec().to_json()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would print two lines before the error line
        with pytest.raises(CheckpointError, match="non-finite values"):
            convert(src, tmp_path / "o.pt")
        convert(src, tmp_path / "o.pt", allow_nonfinite=True)
        with pytest.raises(CheckpointError, match="non-finite values"):
            convert(src, tmp_path / "o2.safetensors", dtype="bfloat16")


# --- zero and empty are values, never "not given" --------------------------------------------------------------------


def test_zero_and_empty_arguments_are_checked_not_defaulted(tmp_path, capsys):
    for tool in ("compare", "profile_step"):
        with pytest.raises(SystemExit) as e:
            bench_module(tool).main(["--seq", "0"])
        assert e.value.code == 2
        assert capsys.readouterr().err == "error: argument --seq-len/--seq: must be an integer >= 1, got 0\n"
    one_line(run_script("train", "--backend", "torch", "--spec", "", "--out", tmp_path / "r", "--quiet"), 2,
             "no spec preset or file named ''")
    assert not (tmp_path / "r").exists()


def test_a_zero_rope_scaling_in_a_config_is_not_read_as_null(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    del config["rope_parameters"]
    (hf / "config.json").write_text(json.dumps({**config, "rope_scaling": 0}))
    with pytest.raises(CheckpointError, match="rope_scaling must be a JSON object, got 0"):
        convert(hf, tmp_path / "o.safetensors")


# --- GLA's forget gates at the ends of their range: reset and open gates keep the recurrence's values ----------------


@pytest.mark.parametrize("scale", quick_first([1e7, 1e5], 0))  # quick: test_gla_chunk.py's strong gates
def test_gla_with_reset_and_open_gates_matches_the_float64_recurrence(scale):
    """Half the key channels' gate projections scaled by `scale`: per token, log α from about −scale/16 (a reset,
    down to −6e5 at 1e7) to 0 (α = 1), mixed within every chunk. The chunk form (chunk 64 over 70 tokens, 16-token
    sub-chunks) gives both twins the float64 recurrence's logits, and finite gradients on which they agree."""
    from shared_config.parity import FORWARD_TOL, GRAD_TOL, max_rel, rel_err

    from ..support import reference
    from ..support.common import tokens
    from ..model.test_gla import both_logits, gla_spec, gla_weights
    from ..support.train_common import both_loss_and_grads

    spec = gla_spec(norm_type="dyt")
    w = gla_weights(spec)
    for i in range(spec.L):
        p = f"model.layers.{i}.self_attn.gk_proj.1"
        w[f"{p}.weight"][::2] *= np.float32(scale)
        w[f"{p}.bias"][::2] = 0.0
    x = tokens(spec, seq=70)
    h = reference.norm(np.asarray(w["model.embed_tokens.weight"], np.float64)[x], w, "model.layers.0.input_layernorm",
                       spec)
    gk = (h @ w["model.layers.0.self_attn.gk_proj.0.weight"].T) @ w["model.layers.0.self_attn.gk_proj.1.weight"].T
    log_a = -np.logaddexp(0, -gk[..., ::2]) / spec.gla_gate_normalizer
    assert log_a.min() < -scale / 100 and log_a.max() > -1e-3, (log_a.min(), log_a.max())  # resets and open gates
    ref = reference.forward(w, spec, x)
    for name, got in zip(("jax", "torch"), both_logits(w, spec, x)):
        assert rel_err(got, ref) <= FORWARD_TOL, f"{name}: {rel_err(got, ref):.2e}"
    (_, gj), (_, gt) = both_loss_and_grads(w, spec, x[:, :45])
    assert all(np.isfinite(g).all() for g in (*gj.values(), *gt.values()))
    bad = {k: f"{max_rel(gj[k], gt[k]):.1e}" for k in gt if not max_rel(gj[k], gt[k]) <= GRAD_TOL}
    assert not bad, bad
