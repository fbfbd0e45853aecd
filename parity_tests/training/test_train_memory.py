"""The train config's memory options (docs/training.md, "Training bigger models") change memory, not the update:
gradient accumulation gives the one-shot step of the same global batch, also when the micro-batches count different
numbers of targets; activation checkpointing (`remat`) and the chunked cross-entropy (`loss_chunk`) give the
plain loss and gradients, in both twins, eager and torch.compile'd. (The mesh, DDP and FSDP2 runs are in
test_sharding.py and test_distributed_torch.py; the memory each option saves is measured by bench/compare.py.)"""

import functools

import numpy as np
import pytest

from shared_config import SpecError, load_train_config
from shared_config.parity import GRAD_TOL, LOSS_TOL, max_rel
from jax_model import gla as jax_gla
from torch_model import gla as torch_gla
from torch_model import loss as torch_loss
from torch_model import train as torch_train

from ..support.common import HYBRID, MIXERS, make_spec, parity_weights, quick_first
from ..support.parallel_runs import masked_batch
from ..support.train_common import TWINS, trajectory

SPEC = make_spec()
TIED = make_spec(tie_embeddings=True)  # the head is the embedding's transpose (SPEC has an lm_head)
# one step, no clipping: AdamW's first moment is then (1 − β1)·g, the gradient up to one rounding
CFG = load_train_config("parity").replace(batch_size=8, seq_len=32, steps=1, warmup_steps=0, grad_clip=0.0)
ACCUM_TOL = 1e-6  # per tensor, max|Δg| / max|g|: the micro-batches' sum against one batch, float32


@functools.cache
def one_step(twin, train, cfg, spec=SPEC):
    """(loss, canonical state) after one step on the masked batch (every row counts a different number of targets)."""
    metrics, state = trajectory(twin, train, parity_weights(spec), spec, cfg,
                                batch=lambda i: masked_batch(cfg, i, spec.V))
    return metrics["loss"][0], state


@pytest.mark.parametrize("steps", [4])
@pytest.mark.parametrize("name,twin,train", TWINS, ids=[t[0] for t in TWINS])
def test_accumulated_step_is_the_one_shot_step(name, twin, train, steps):
    tokens, mask = masked_batch(CFG, 0, SPEC.V)
    counts = [int(m[:, 1:].sum()) for m in train.micro_batches(np.asarray(mask), steps)]
    assert len(set(counts)) == steps, f"the micro-batches must count different numbers of targets: {counts}"
    loss, ref = one_step(twin, train, CFG)
    got_loss, got = one_step(twin, train, CFG.replace(grad_accum_steps=steps))
    assert abs(got_loss - loss) / loss <= LOSS_TOL
    errors = {k: max_rel(got["m"][k], r) for k, r in ref["m"].items()}
    assert max(errors.values()) <= ACCUM_TOL, {k: f"{e:.1e}" for k, e in errors.items() if e > ACCUM_TOL}
    # AdamW's first step moves a weight by lr·g/(|g| + eps): where |g| is near eps that multiplies the gradient's
    # last-bit differences by up to |g|/eps, so the weights are compared where |g| >= 1e3·eps (a sign-like update)
    sign_like = {k: np.abs(m) / (1 - CFG.beta1) >= 1e3 * CFG.eps for k, m in ref["m"].items()}
    assert (max(max_rel(got["weights"][k][sign_like[k]], r[sign_like[k]]) for k, r in ref["weights"].items())
            <= ACCUM_TOL)


@pytest.mark.parametrize("name,twin,train", TWINS, ids=[t[0] for t in TWINS])
def test_micro_batches_take_strided_rows_and_must_divide(name, twin, train):
    x_BN = np.arange(8)[:, None] * np.ones((1, 3), int)
    assert np.asarray(train.micro_batches(x_BN, 2))[:, :, 0].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(SpecError, match="grad_accum_steps=3 must divide the 8 rows"):
        train.micro_batches(x_BN, 3)


CASES = [("block", 0, SPEC), ("full", 0, TIED), ("none", 48, SPEC), ("none", 1000, TIED), ("full", 64, SPEC)]


@pytest.mark.parametrize("remat,loss_chunk,spec", quick_first(CASES, 2, multi=True),
                         ids=[f"{r},{c},{'tied' if s.tie_embeddings else 'untied'}"
                                                             for r, c, s in CASES])
def test_remat_and_chunked_loss_give_the_plain_gradients(remat, loss_chunk, spec):
    """loss_chunk 48 leaves a short last chunk of the 8·32 tokens, 1000 one chunk larger than them all."""
    options = dict(remat=remat, loss_chunk=loss_chunk)
    tokens, mask = masked_batch(CFG, 0, spec.V)
    weights = parity_weights(spec)
    results = {}
    for name, twin, train in TWINS:
        loss, grads = train.loss_and_grads(twin.from_weights(weights, spec), tokens, mask)
        got_loss, got = train.loss_and_grads(twin.from_weights(weights, spec), tokens, mask, **options)
        assert abs(got_loss - loss) / loss <= LOSS_TOL, name
        errors = {k: max_rel(got[k], g) for k, g in grads.items()}
        assert max(errors.values()) <= ACCUM_TOL, (name, {k: f"{e:.1e}" for k, e in errors.items() if e > ACCUM_TOL})
        if name == "torch" and not loss_chunk:  # the recomputed forward is the forward: bit for bit
            assert all(np.array_equal(got[k], g) for k, g in grads.items())
        results[name] = got
    assert max(max_rel(results["jax"][k], g) for k, g in results["torch"].items()) <= GRAD_TOL


@pytest.mark.slow
def test_torch_compile_runs_every_option_together():
    """torch.compile'd step with accumulation, block remat and the chunked loss: the eager one-shot step."""
    cfg = CFG.replace(grad_accum_steps=2, remat="block", loss_chunk=48)
    _, ref = one_step(*TWINS[1][1:], CFG)
    model = TWINS[1][1].from_weights(parity_weights(SPEC), SPEC)
    state, step = torch_train.init_train_state(model, cfg), torch_train.make_train_step(model, cfg, compile=True)
    state, _ = step(state, *masked_batch(cfg, 0, SPEC.V))
    got = torch_train.get_train_state(model, state)
    assert max(max_rel(got["m"][k], r) for k, r in ref["m"].items()) <= ACCUM_TOL


@pytest.mark.parametrize("chunk", [8 * 32, 10**12])
def test_a_loss_chunk_at_or_past_the_tokens_is_no_chunking(chunk, monkeypatch):
    """The 8·32 target tokens in one chunk, or a chunk of 10^12 tokens (which the config accepts): the plain loss,
    traced and computed as without chunking (JAX never pads a [10^12, D] array; torch never runs the fused loss)."""
    import jax
    import jax.ad_checkpoint
    import jax.extend.core

    from jax_model import train as jax_train

    tokens, mask = masked_batch(CFG, 0, SPEC.V)
    (_, jax_twin, _), (_, torch_twin, _) = TWINS
    model = jax_twin.from_weights(parity_weights(SPEC), SPEC)
    traced = [str(jax.make_jaxpr(lambda t: jax_train.model_loss(model, t, mask, loss_chunk=c))(tokens))
              for c in (0, chunk)]
    assert traced[1] == traced[0]
    monkeypatch.setattr(torch_loss, "fused_head_loss", lambda *a, **k: pytest.fail("the loss was chunked"))
    losses = [torch_train.loss_and_grads(torch_twin.from_weights(parity_weights(SPEC), SPEC), tokens, mask,
                                         loss_chunk=c)[0] for c in (0, chunk)]
    assert losses[1] == losses[0]


def test_the_memory_pre_check_counts_every_memory_option(monkeypatch):
    """train_bytes (scripts/train.py's and bench/compare.py's check before allocating) with each option."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    spec = make_spec(vocab_size=50_000)
    plain = resources.train_bytes(spec, 8, 256)
    assert resources.train_bytes(spec, 8, 256, loss_chunk=10**12) == plain  # past the tokens: no chunking
    assert resources.train_bytes(spec, 8, 256, loss_chunk=64) < plain / 4  # the [B·T, V] logits dominate
    assert resources.train_bytes(spec, 8, 256, grad_accum_steps=4) < plain / 3  # one micro-batch's activations
    assert resources.train_bytes(spec, 8, 256, remat="block") < plain
    assert resources.train_bytes(spec, 8, 256, remat="full") < resources.train_bytes(spec, 8, 256, remat="block")


# The token mixers' estimates at one size: D 48, H 4, F 80 (GLA: d_k 24, d_v 60, K' 6, V' 15, gate rank 5), long rows
GLA, ATTENTION = make_spec(**MIXERS["gla"]), make_spec(n_heads=4, n_kv_heads=None)
ROWS, T = 2, 4096


def test_the_estimate_grows_linearly_in_the_tokens_for_every_mixer(monkeypatch):
    """A lower bound for every attention kernel: torch's SDPA keeps no [H, T, T] weights (measured at D 256, 2 layers,
    2 x 2048 tokens: 195 MiB in all, the weights alone 268), and GLA's chunk form keeps O(T·C) per row, so doubling
    the tokens (whole 64-token chunks) doubles the activations, as it does the logits. The [H, T, T] term counted for
    every layer made a GLA model at 1 x 8192 tokens 2.7x its measured peak."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    for spec in (GLA, ATTENTION):
        base, one, two = (resources.train_bytes(spec, ROWS, t) for t in (0, T, 2 * T))
        assert two - base == 2 * (one - base), spec.mixer
    # the chunk sizes it counts are the twins' (a compute choice, not a spec field)
    assert (resources.GLA_CHUNK, resources.GLA_SUB) == (torch_gla.CHUNK, torch_gla.SUB) == (jax_gla.CHUNK, jax_gla.SUB)


def test_grouped_keys_keep_narrower_keys_and_values(monkeypatch):
    """K key/value heads of E keep 2 (H - K) E values per token fewer in each attention layer (4 D counted for q, k,
    v and the output made the bound overstate a grouped-keys model: no longer a lower bound)."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    gqa = ATTENTION.replace(n_kv_heads=1)
    weights = 4 * (resources.layout_size(ATTENTION)[1] - resources.layout_size(gqa)[1])  # k/v_proj's fewer rows
    saved = 4 * ATTENTION.L * ROWS * T * 2 * (ATTENTION.H - 1) * ATTENTION.E  # remat block: each layer's k, v too
    for remat in ("none", "block"):
        got = resources.train_bytes(ATTENTION, ROWS, T, remat=remat) - resources.train_bytes(gqa, ROWS, T, remat=remat)
        assert got == 8 * weights + saved, (remat, got, 8 * weights + saved)


def test_gla_remat_keeps_less_for_the_backward(monkeypatch):
    """full < block < none for GLA as for attention."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    gla = {r: resources.train_bytes(GLA, ROWS, T, remat=r) for r in ("full", "block", "none")}
    assert gla["full"] < gla["block"] < gla["none"]


def gla_layer_values(s, rows, t):
    """One GLA layer's kept float32 values, written out from train_bytes' docstring (t a multiple of the 64-token
    chunk: 4 sub-chunks of 16): around the mixer, q/k/log-gates, gate rank, v/output gate/output, sub-chunk pairs,
    decayed keys, intra-chunk scores; the state per chunk."""
    per_token = 8 * s.D + 3 * s.F + 3 * s.d_k + s.gla_gate_rank + 3 * s.d_v + 3 * 17 * s.d_k // 2 + 3 * s.d_k + 64 * s.H
    return rows * t * per_token + rows * (t // 64) * s.H * s.Kh * s.Vh


@pytest.mark.parametrize("n_layers", [3, 10**400], ids=["L3", "L1e400"])
def test_a_hybrid_estimate_is_the_sum_of_its_layers_kinds(n_layers, monkeypatch):
    """GLA, attention, GLA, ... (every 2nd layer attention): its layers counted by kind (`spec.layer_mixers`, not a
    walk over the layers: a spec claiming 10**400 of them is sized at once), between a GLA and an attention model."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    spec = make_spec(**HYBRID).replace(n_layers=n_layers)
    got = {r: resources.train_bytes(spec, ROWS, T, remat=r) for r in ("none", "full")}
    params, tokens = resources.layout_size(spec)[1], ROWS * T
    attention = tokens * (12 * spec.D + 3 * spec.F)
    n_attention = n_layers // 2
    gla = gla_layer_values(spec, ROWS, T)
    last = attention if n_layers % 2 == 0 else gla  # layer L - 1 is attention when L is even
    rest = 8 * params + 3 * tokens * spec.V
    assert got["none"] == 4 * (rest + n_attention * attention + (n_layers - n_attention) * gla)
    assert got["full"] == 4 * (rest + (n_layers - 1) * tokens * spec.D + last)
    if n_layers == 3:
        pure = [resources.train_bytes(make_spec(**c, n_layers=3), ROWS, T)
                for c in (MIXERS["gla"], dict(n_heads=4, n_kv_heads=None))]
        assert min(pure) < got["none"] < max(pure)


def test_the_chunked_loss_runs_three_head_matmuls_per_chunk_and_keeps_no_logits():
    """The fused LM head + cross-entropy (head_loss.py): per chunk one matmul for the logits and, in the same
    forward, one for each gradient (hidden states, head weight); the backward runs none (the recomputing form it
    replaced ran four per chunk) and nothing [tokens, V] is saved for it. Counted in JAX's jaxpr of the gradient
    and in torch's dispatched ops, V chosen unlike any other dim."""
    import jax
    import jax.ad_checkpoint
    import jax.extend.core
    from flax import nnx
    from torch.utils._python_dispatch import TorchDispatchMode

    from jax_model import train as jax_train

    spec = make_spec(vocab_size=97)
    tokens, mask = masked_batch(CFG, 0, spec.V)
    (_, jax_twin, _), (_, torch_twin, _) = TWINS
    chunks = -(-CFG.batch_size * CFG.seq_len // 48)

    def head_dots(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                n += any(spec.V in v.aval.shape for v in [*eqn.invars, *eqn.outvars])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += head_dots(sub) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        return n

    graphdef, params, rest = jax_train.split_params(jax_twin.from_weights(parity_weights(spec), spec))
    loss = lambda p: jax_train.model_loss(nnx.merge(graphdef, p, rest), tokens, mask, loss_chunk=48)  # noqa: E731
    assert head_dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr) == 3 * chunks

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [tuple(a.shape) for a in args if hasattr(a, "shape")]
            CountMatmuls.n += (func.__name__.startswith(("mm", "addmm", "bmm", "matmul"))
                               and any(spec.V in s for s in shapes))
            return func(*args, **(kwargs or {}))

    torch_model = torch_twin.from_weights(parity_weights(spec), spec)
    with CountMatmuls():
        torch_train.loss_and_grads(torch_model, tokens, mask, loss_chunk=48)
    assert CountMatmuls.n == 3 * chunks


SAVED_CASES = [dict(norm_type="rms", mlp="swiglu"), dict(norm_type="layernorm", mlp="gelu", norm_bias=True),
               dict(norm_type="dyt", mlp="relu2"), dict(norm_type="derf", mlp="gelu_tanh", norm_bias=True)]


@pytest.mark.parametrize("changes", quick_first(SAVED_CASES, 1), ids=[c["norm_type"] for c in SAVED_CASES])
def test_a_bf16_step_saves_no_float32_activations_for_the_backward(changes, capsys):
    """The float32 work between matmuls (norms, activations) is recomputed in the backward (layers.recomputed):
    what a bf16 step keeps for the backward at the model dim D, the ffn dim F or 2F is in bf16 (per token and layer
    of `small` 10 KB, not 53 KB). Listed by JAX's print_saved_residuals and torch's saved-tensor hooks; the chunked
    loss keeps no logits, and T = 24 tells activations from attention's [B, H, ...] blocks."""
    import jax
    import jax.ad_checkpoint
    import torch
    from flax import nnx

    from jax_model import train as jax_train

    spec = make_spec(compute_dtype="bfloat16", **changes)
    cfg = CFG.replace(seq_len=24)
    tokens, mask = masked_batch(cfg, 0, spec.V)
    (_, jax_twin, _), (_, torch_twin, _) = TWINS
    widths = {spec.D, spec.F, 2 * spec.F}

    def activation(dtype: str, shape: tuple[int, ...]) -> str | None:
        rows = shape[:2] == (cfg.batch_size, cfg.seq_len) or shape[:1] == (cfg.batch_size * cfg.seq_len,)
        return f"{dtype}{list(shape)}" if rows and shape[-1] in widths else None

    graphdef, params, rest = jax_train.split_params(jax_twin.from_weights(parity_weights(spec), spec))
    loss = lambda p: jax_train.model_loss(nnx.merge(graphdef, p, rest), tokens, mask, loss_chunk=48)  # noqa: E731
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    residuals = [line.split(" output")[0].split(" from")[0] for line in capsys.readouterr().out.splitlines()]
    short = {"f32": "float32", "bf16": "bfloat16"}  # as print_saved_residuals writes them: f32[8, 24, 48]
    kept = {"jax": [a for r in residuals if "[" in r and (a := activation(short.get(r.split("[")[0]), tuple(
        int(n) for n in r.split("[")[1].rstrip("]").split(",") if n)))]}

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch_train.model_loss(torch_twin.from_weights(parity_weights(spec), spec), tokens, mask, loss_chunk=48)
    kept["torch"] = [a for t in saved if (a := activation(str(t.dtype).removeprefix("torch."), tuple(t.shape)))]
    for name, activations in kept.items():
        assert activations, f"{name}: no activation found: the test no longer sees what the step saves"
        assert all(a.startswith("bfloat16") for a in activations), (name, activations)


@pytest.mark.parametrize("remat", quick_first(["none", "block"], 1))
def test_bf16_recompute_traces_under_torch_compile(remat):
    """What the GPU bench runs: bf16 blocks torch.compile'd one by one, the norms' and activations' recompute
    (torch.utils.checkpoint) inside them, alone and nested in block remat. aot_eager here: dynamo and AOT
    autograd trace it as inductor's path does, without generating code. The gradients are eager's, bit for bit."""
    spec = make_spec(compute_dtype="bfloat16")
    tokens, mask = masked_batch(CFG, 0, spec.V)
    torch_twin = TWINS[1][1]
    _, eager = torch_train.loss_and_grads(torch_twin.from_weights(parity_weights(spec), spec), tokens, mask,
                                          remat=remat)
    model = torch_twin.from_weights(parity_weights(spec), spec)
    torch_train.compile_blocks(model, backend="aot_eager")
    _, compiled = torch_train.loss_and_grads(model, tokens, mask, remat=remat)
    errors = [max_rel(compiled[k], g) for k, g in eager.items()]
    assert max(errors) == 0.0, errors  # aot_eager runs the same aten ops as eager: bit for bit
