"""Per-layer parity: each norm type, RoPE, attention, MLP and one block, against each other and
against the float64 reference, on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model
import torch_model
from jax_model import attention as ja
from jax_model import layers as jl
from shared_config import init_weights, layout, rope_inv_freq
from shared_config.spec import CHOICES
from torch_model import attention as ta
from torch_model import layers as tl

from ..support import reference
from ..support.common import FORWARD_TOL, case_ids, make_spec, parity_weights, quick_first, rel_err
from ..support.oracles import bf16_values, rounded_more_than_once


def twins(spec):
    w = parity_weights(spec)
    return w, jax_model.from_weights(w, spec, "einsum"), torch_model.from_weights(w, spec, "einsum")


def inputs(spec, seq=64, seed=0):
    return np.random.default_rng(seed).standard_normal((2, seq, spec.D)).astype(np.float32)


def run(fn_jax, fn_torch, *args):
    j = np.asarray(fn_jax(*(jnp.asarray(a) if a is not None else None for a in args)))
    with torch.no_grad():
        t = fn_torch(*(torch.as_tensor(a) if a is not None else None for a in args)).numpy()
    return j, t


def check(j, t, ref):
    assert rel_err(j, t) <= FORWARD_TOL and rel_err(j, ref) <= FORWARD_TOL and rel_err(t, ref) <= FORWARD_TOL, (
        rel_err(j, t), rel_err(j, ref), rel_err(t, ref))


@pytest.mark.parametrize("norm_type", CHOICES["norm_type"])  # a new type runs here without a line of its own
@pytest.mark.parametrize("bias", [False, True])
def test_norm(norm_type, bias):
    spec = make_spec(norm_type=norm_type, norm_bias=bias, norm_eps=1e-3)
    w, jm, tm = twins(spec)
    x = 3 * inputs(spec) + 1  # non-zero mean so layernorm's centring matters
    j, t = run(jm.model.layers[1].post_attention_layernorm, tm.model.layers[1].post_attention_layernorm, x)
    check(j, t, reference.norm(x.astype(np.float64), w, "model.layers.1.post_attention_layernorm", spec))


@pytest.mark.parametrize("norm_type", CHOICES["norm_type"])
def test_parity_weights_move_every_norm_parameter_off_its_init(norm_type):
    """parity_weights perturbs norm parameters by leaf name; a leaf it does not know (a new norm's) would stay at its
    init value, and a twin that ignored it (computing with the init constant) would pass every parity test."""
    for bias in (False, True):
        spec = make_spec(norm_type=norm_type, norm_bias=bias, norm_placement="peri", qk_norm=True,
                         embed_scale="learnable", embed_norm=True)
        w, init = parity_weights(spec), init_weights(spec, 0)
        kept = [t.name for t in layout(spec) if t.kind == "param" and np.any(w[t.name] == init[t.name])]
        assert not kept, f"parity_weights leaves these at their init value: {kept}"


@pytest.mark.parametrize("norm_type", CHOICES["norm_type"])
def test_norm_statistics_are_float32_on_bfloat16_inputs(norm_type):
    """On bf16 activations with a large mean (64 + N(0, 1): bf16's spacing there is 0.5), each norm's output is the
    float64 norm of the same bf16 values to bf16's own rounding. A LayerNorm whose mean ran in bf16 (the cast to
    float32 missing) is off by 9%, which the model-level bf16 bounds (test_bf16.py) do not see. (RMSNorm's mean
    square without the cast stays within them: both frameworks accumulate a bf16 mean in float32.)"""
    import ml_dtypes

    spec = make_spec(norm_type=norm_type, norm_bias=True, norm_eps=1e-3)
    w, jm, tm = twins(spec)
    x = (64 + inputs(spec)).astype(ml_dtypes.bfloat16).astype(np.float32)  # values bf16 holds exactly
    ref = reference.norm(x.astype(np.float64), w, "model.layers.1.post_attention_layernorm", spec)
    j = jm.model.layers[1].post_attention_layernorm(jnp.asarray(x, jnp.bfloat16))
    with torch.no_grad():
        t = tm.model.layers[1].post_attention_layernorm(torch.as_tensor(x).to(torch.bfloat16))
    for name, got in (("jax", np.asarray(j.astype(jnp.float32))), ("torch", t.float().numpy())):
        assert got.dtype == np.float32 and np.abs(got - ref).max() <= 2**-7 * np.abs(ref).max(), (
            name, np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("norm_type", CHOICES["norm_type"])
def test_norm_outputs_on_bfloat16_inputs_are_rounded_once(norm_type):
    """With its statistics and scaling in float32, a norm's bf16 output is the float64 norm of the same bf16 inputs
    rounded once to bf16: within half of bf16's spacing at each value (plus float32's own error). Computed in bf16
    (an RMSNorm's cast to float32 dropped), the rsqrt and the product are each rounded to bf16 too: about 1.5 spacings,
    which test_norm_statistics_are_float32_on_bfloat16_inputs' bound, and the model-level bf16 bounds, let pass."""
    import ml_dtypes

    spec = make_spec(norm_type=norm_type, norm_bias=True, norm_eps=1e-3)
    w, jm, tm = twins(spec)
    x = inputs(spec).astype(ml_dtypes.bfloat16).astype(np.float32)  # values bf16 holds exactly
    ref = reference.norm(x.astype(np.float64), w, "model.layers.1.post_attention_layernorm", spec)
    j = jm.model.layers[1].post_attention_layernorm(jnp.asarray(x, jnp.bfloat16))
    with torch.no_grad():
        t = tm.model.layers[1].post_attention_layernorm(torch.as_tensor(x).to(torch.bfloat16))
    terms = np.abs(ref) + 2 * np.abs(w["model.layers.1.post_attention_layernorm.bias"])  # before the bias cancels
    for name, got in (("jax", np.asarray(j.astype(jnp.float32))), ("torch", t.float().numpy())):
        assert (fault := rounded_more_than_once(got, ref, terms)) is None, (name, fault)


@pytest.mark.parametrize("kind", CHOICES["mlp"])
def test_mlp_activations_on_bfloat16_inputs_are_rounded_once(kind):
    """The MLP's activation runs in float32 and is cast back once: SwiGLU's silu(gate)·up computed in bf16 (its
    float32 cast dropped) rounds silu(gate) and the product each, which every model-level bf16 bound let pass."""
    width = 64
    x = bf16_values((2, 8, 2 * width if kind == "swiglu" else width))
    if kind == "swiglu":
        ref = reference.hidden(kind, x[..., width:].astype(np.float64), x[..., :width].astype(np.float64))
        j = jl.swiglu(jnp.asarray(x, jnp.bfloat16), jnp.bfloat16)
        t = tl.swiglu(torch.as_tensor(x).to(torch.bfloat16), torch.bfloat16)
    else:
        ref = reference.hidden(kind, x.astype(np.float64))
        j = jl.activate(jl.ACTIVATIONS[kind], jnp.asarray(x, jnp.bfloat16), jnp.bfloat16)
        t = tl.activate(tl.ACTIVATIONS[kind], torch.as_tensor(x).to(torch.bfloat16), torch.bfloat16)
    terms = np.abs(ref) if kind == "swiglu" else np.abs(ref) + np.abs(x)  # GELU: x·(1 + erf(..)) cancels for x < 0
    for name, got in (("jax", np.asarray(j.astype(jnp.float32))), ("torch", t.float().numpy())):
        assert (fault := rounded_more_than_once(got, ref, terms)) is None, (name, fault)


def test_rope_on_bfloat16_inputs_is_rounded_once():
    """RoPE rotates in float32 and casts back once: computed in bf16 (the cast dropped), x·cos, rotate(x)·sin and
    their sum are each rounded, which every model-level bf16 bound let pass."""
    spec = make_spec()
    x = bf16_values((2, 16, spec.H, spec.E))
    pos = np.arange(16)
    ref = reference.rope(x.astype(np.float64), spec, pos)
    terms = np.abs(x) + np.abs(np.concatenate([x[..., spec.E // 2:], x[..., :spec.E // 2]], axis=-1))
    j = ja.apply_rope(jnp.asarray(x, jnp.bfloat16), *ja.rope_cos_sin(rope_inv_freq(spec), jnp.asarray(pos)))
    t = ta.apply_rope(torch.as_tensor(x).to(torch.bfloat16),
                      *ta.rope_cos_sin(rope_inv_freq(spec), torch.as_tensor(pos)))
    for name, got in (("jax", np.asarray(j.astype(jnp.float32))), ("torch", t.float().numpy())):
        assert (fault := rounded_more_than_once(got, ref, terms)) is None, (name, fault)


def test_the_models_rotate_by_float32_angles_in_bf16(monkeypatch):
    """The rotation above is exact only if it gets float32 cos and sin: a model casting them to the activations'
    dtype first (Hugging Face's Llama does) passed every test. Each twin's attention is handed float32 ones."""
    spec = make_spec(compute_dtype="bfloat16")
    w = parity_weights(spec)
    seen = []
    for module, model, tokens in ((ja, jax_model.from_weights(w, spec), jnp.asarray),
                                  (ta, torch_model.from_weights(w, spec), torch.as_tensor)):
        rotate = module.apply_rope

        def spy(x, cos, sin, rotate=rotate):
            seen.append((module.__name__, str(x.dtype), str(cos.dtype), str(sin.dtype)))
            return rotate(x, cos, sin)

        monkeypatch.setattr(module, "apply_rope", spy)
        with torch.no_grad():
            model(tokens(np.arange(12).reshape(2, 6) % spec.V))
    assert {m for m, *_ in seen} == {"jax_model.attention", "torch_model.attention"}
    for name, x, cos, sin in seen:
        assert x.endswith("bfloat16") and cos.endswith("float32") and sin.endswith("float32"), (name, x, cos, sin)


def unknown_norm_spec():
    """A valid spec whose norm_type is then set to a value no code knows (as a value newly added to CHOICES)."""
    spec = make_spec()
    object.__setattr__(spec, "norm_type", "not-a-norm")  # past the spec's own check
    return spec


def test_every_norm_builder_refuses_a_norm_type_it_does_not_know():
    """A value added to CHOICES["norm_type"] and not to a builder is an error there, not another norm's class."""
    spec = unknown_norm_spec()
    for builder in (jl.make_norm, tl.make_norm):
        with pytest.raises(ValueError, match="norm_type='not-a-norm'"):
            builder(spec, 0.5)
    with pytest.raises(ValueError, match="norm_type='not-a-norm'"):
        reference.norm(np.ones((1, 2, spec.D)), {"x.weight": np.ones(spec.D)}, "x", spec)
    with pytest.raises(ValueError, match="layout: no tensors for norm_type='not-a-norm'"):
        layout(spec)  # it gave the slot RMSNorm's weight (and bias)


def test_the_reference_refuses_an_mlp_it_does_not_know():
    """An mlp value added to CHOICES and to the twins' ACTIVATIONS, not to the reference, was checked against relu²."""
    spec = make_spec(mlp="gelu")
    object.__setattr__(spec, "mlp", "not-an-mlp")
    with pytest.raises(ValueError, match="mlp='not-an-mlp'"):
        reference.mlp(np.ones((1, 2, spec.D)), {"x.up_proj.weight": np.ones((spec.F, spec.D))}, "x", spec)


def test_the_reference_refuses_a_placement_it_does_not_know():
    """A norm_placement added to CHOICES and PLACEMENTS, not to the reference's block, ran its last lines, Pre-LN,
    and passed against twins that computed Pre-LN for it too (found following docs/extending.md for Mix-LN)."""
    spec = make_spec()
    object.__setattr__(spec, "norm_placement", "not-a-placement")
    with pytest.raises(ValueError, match="^reference.block: norm_placement='not-a-placement' is not written here$"):
        reference.block(np.ones((1, 2, spec.D)), {}, "model.layers.0", 0, spec)


def test_every_mixer_and_router_builder_refuses_a_value_it_does_not_know():
    """The same for the two-way choices: an unknown mixer was attention and an unknown routing kind DTF, in the
    layout, both twins' blocks and the reference; an unknown mixer's decoding state was attention's KV cache
    (`empty_state`, which init_cache calls per layer, and the layout's `state_layout`/`state_arrays` that weigh it)."""
    from flax import nnx

    from jax_model import block as jb
    from shared_config.layout import state_arrays, state_layout
    from torch_model import block as tb

    spec = make_spec()
    object.__setattr__(spec, "mixer", "not-a-mixer")
    x = np.ones((1, 2, spec.D))
    bad = spec.mixer_of(0)  # each layer's mixer, as the model passes it
    for build in (lambda: layout(spec), lambda: jb.make_mixer(spec, bad, "xla", nnx.Rngs(0)),
                  lambda: tb.make_mixer(spec, bad, "sdpa"), lambda: reference.attention(x, {}, "x", spec),
                  lambda: jb.empty_state(spec, bad, 1, 4), lambda: tb.empty_state(spec, bad, 1, 4, torch.zeros(1)),
                  lambda: state_layout(spec, bad, 1, 4), lambda: state_arrays(bad)):
        with pytest.raises(ValueError, match="mixer='not-a-mixer'"):
            build()
    spec = make_spec(routing="mod")
    object.__setattr__(spec, "routing", "not-a-router")
    for build in (lambda: layout(spec), lambda: jb.make_router(spec, nnx.Rngs(0)), lambda: tb.make_router(spec),
                  lambda: reference.router_scores(x, x, {}, "x", spec)):
        with pytest.raises(ValueError, match="routing='not-a-router'"):
            build()


@pytest.mark.parametrize("scaling", ["none", "llama3"])
def test_rope(scaling):
    """The rotation, fed the frequencies the reference derives from the spec (not the twins' `rope_inv_freq`)."""
    spec = make_spec(head_dim=16, rope_scaling=scaling, rope_original_max_seq_len=64, rope_scaling_factor=8.0)
    x = np.random.default_rng(0).standard_normal((2, 256, 3, 16)).astype(np.float32)
    pos, inv_freq = np.arange(256), reference.inv_frequencies(spec)
    j = np.asarray(ja.apply_rope(jnp.asarray(x), *ja.rope_cos_sin(inv_freq, jnp.asarray(pos))))
    t = ta.apply_rope(torch.as_tensor(x), *ta.rope_cos_sin(inv_freq, torch.as_tensor(pos))).numpy()
    ref = reference.rope(x.astype(np.float64), spec)
    # Angles up to 255 rad: float32 rounding of the angle alone is ~1e-5 rad there, so compare absolutely.
    assert np.abs(j - t).max() < 1e-4 and np.abs(j - ref).max() < 1e-4 and np.abs(t - ref).max() < 1e-4
    np.testing.assert_allclose(rope_inv_freq(spec), reference.inv_frequencies(spec), rtol=1e-6)
    assert not np.allclose(np.asarray(j[:, 1:]), x[:, 1:], atol=1e-2)  # it rotates something


ROPE_SPECS = [{"rope_theta": 500000.0}, {"rope_theta": 300.0, "head_dim": 16},
              {"rope_scaling": "llama3", "rope_original_max_seq_len": 32, "rope_scaling_factor": 4.0,
               "rope_theta": 5000.0}]


def check_model_rope(changes):
    """Each twin built from the spec alone (frequencies its own business): layer 0's attention output equals the
    reference's, whose frequencies come from the spec's rope_theta and scaling fields."""
    spec = make_spec(**changes)
    w, toks = parity_weights(spec), np.random.default_rng(0).integers(0, spec.V, (2, 64))
    ref_taps: dict = {}
    reference.forward(w, spec, toks, ref_taps)
    want = ref_taps["model.layers.0"]["attn_out"]
    jt, tt = {}, {}
    jax_model.from_weights(w, spec, "einsum")(jnp.asarray(toks), taps=jt)
    with torch.no_grad():
        torch_model.from_weights(w, spec, "einsum")(torch.as_tensor(toks), taps=tt)
    for twin, got in (("jax", np.asarray(jt["model.layers.0"]["attn_out"])),
                      ("torch", tt["model.layers.0"]["attn_out"].numpy())):
        assert rel_err(got, want) <= FORWARD_TOL, f"{twin}: layer 0 attention vs the reference {rel_err(got, want):.1e}"


@pytest.mark.parametrize("changes", ROPE_SPECS, ids=case_ids(ROPE_SPECS))
def test_model_rope_reads_the_spec(changes):
    check_model_rope(changes)


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 6}, {"qk_norm": True}, {"fused_qkv": False},
                                     {"head_dim": 12}])
def test_attention(changes):
    spec = make_spec(**changes)
    w, jm, tm = twins(spec)
    x = inputs(spec)
    pos = np.arange(x.shape[1])
    jcs = ja.rope_cos_sin(rope_inv_freq(spec), jnp.asarray(pos))
    tcs = ta.rope_cos_sin(rope_inv_freq(spec), torch.as_tensor(pos))
    j = np.asarray(jm.model.layers[0].self_attn(jnp.asarray(x), *jcs)[0])  # (output, cache)
    with torch.no_grad():
        t = tm.model.layers[0].self_attn(torch.as_tensor(x), *tcs)[0].numpy()
    check(j, t, reference.attention(x.astype(np.float64), w, "model.layers.0.self_attn", spec))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "gelu_tanh", "relu2"])
def test_mlp(mlp):
    spec = make_spec(mlp=mlp)
    w, jm, tm = twins(spec)
    x = inputs(spec)
    j, t = run(jm.model.layers[0].mlp, tm.model.layers[0].mlp, x)
    check(j, t, reference.mlp(x.astype(np.float64), w, "model.layers.0.mlp", spec))


def test_swiglu_runs_gate_and_up_as_one_matmul():
    """The canonical layout keeps gate_proj and up_proj apart; at compute time both twins join them into one
    [D, 2F] matmul (one read of the activations, one larger GEMM): one dot in the JAX twin's jaxpr and one mm in
    torch's dispatched ops carry 2F outputs, none carries F (the down projection reads F)."""
    import jax
    from torch.utils._python_dispatch import TorchDispatchMode

    spec = make_spec(mlp="swiglu")
    _, jm, tm = twins(spec)
    x = inputs(spec)
    jaxpr = jax.make_jaxpr(jm.model.layers[0].mlp)(jnp.asarray(x))
    outs = [eqn.outvars[0].aval.shape[-1] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert sorted(outs) == sorted([2 * spec.F, spec.D]), outs

    class Matmuls(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith(("mm", "addmm", "bmm")):
                Matmuls.seen.append(out.shape[-1])
            return out

    with Matmuls(), torch.no_grad():
        tm.model.layers[0].mlp(torch.as_tensor(x))
    assert sorted(Matmuls.seen) == sorted([2 * spec.F, spec.D]), Matmuls.seen


def test_gelu_variants_differ():
    """`gelu` (exact) and `gelu_tanh` must not silently be the same function."""
    x = torch.linspace(-4, 4, 101)
    assert (tl.ACTIVATIONS["gelu"](x) - tl.ACTIVATIONS["gelu_tanh"](x)).abs().max() > 1e-4
    xj = jnp.linspace(-4, 4, 101)
    assert jnp.abs(jl.ACTIVATIONS["gelu"](xj) - jl.ACTIVATIONS["gelu_tanh"](xj)).max() > 1e-4


@pytest.mark.parametrize("placement", CHOICES["norm_placement"])
def test_block(placement):
    """Blocks 0 and 1 (HybridNorm* treats block 0 apart) against the reference's block, written from the equations."""
    spec = make_spec(norm_type="dyt", norm_placement=placement)
    w, jm, tm = twins(spec)
    x = inputs(spec)
    pos = np.arange(x.shape[1])
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    for i in (0, 1):
        jt, tt = {}, {}
        j = np.asarray(jm.model.layers[i](jnp.asarray(x), *ja.rope_cos_sin(rope_inv_freq(spec), jnp.asarray(pos)),
                                          taps=jt)[0])
        with torch.no_grad():
            t = tm.model.layers[i](torch.as_tensor(x), *ta.rope_cos_sin(rope_inv_freq(spec), torch.as_tensor(pos)),
                                   taps=tt)[0].numpy()
        ref, a, m = reference.block(x.astype(np.float64), w64, f"model.layers.{i}", i, spec)
        check(j, t, ref)
        check(np.asarray(jt["attn_out"]), tt["attn_out"].numpy(), a)
        check(np.asarray(jt["mlp_out"]), tt["mlp_out"].numpy(), m)


@pytest.mark.parametrize("T", quick_first([1, 31, 77, 600], 3))
def test_blocked_attention_is_the_einsum_kernel_by_blocks(T):
    """`blocked` skips the masked blocks of q·kᵀ: same result as the one-product kernel, any T (ragged last block)."""
    rng = np.random.default_rng(T)
    q, k, v = (rng.standard_normal((2, T, n, 8)).astype(np.float32) for n in (6, 2, 2))
    # JAX's kernels compiled as one program each, as a model runs them (op by op, each block's ops compiled one by one)
    for name, einsum, attend, asarray, out in [
        ("jax", jax.jit(ja.einsum_attention), jax.jit(ja.attend, static_argnums=3), jnp.asarray, np.asarray),
        ("torch", ta.einsum_attention, ta.attend, torch.as_tensor, lambda t: t.numpy()),
    ]:
        ref = out(einsum(asarray(q), asarray(k), asarray(v)))
        got = out(attend(asarray(q), asarray(k), asarray(v), "blocked"))
        assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max(), name
    assert ja.attention_block(600) == ta.attention_block(600) == 38  # at most 16 blocks
