""""The first non-finite tensor" is the first in model order in both twins: the taps of train.py's replay keep
the order the model computes them (layers.2 before layers.10, logits last), the gradients keep layout order (fused
q/k/v split back in place), and the issue's diverging run names the same tensor in both twins."""

import numpy as np
import pytest

from shared_config import fuse_qkv, layout, split_qkv
from shared_config.loop import Loop, NonFiniteError, trainer_factory
from shared_config.run import resolve_run
from shared_config.twins import twin

from ..support.common import load_script, make_spec, quick_first

T = load_script("train")
# 11 layers: sorted names would put model.layers.10 before model.layers.2, and logits first
SMALL = ["--spec", "tiny", "--set", "n_layers=11", "--set", "d_model=16", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--set", "d_ff=24", "--set", "batch_size=2", "--set", "seq_len=8", "--log-every", "1", "--eval-every", "0"]


def resolve(out, backend, *extra):
    return resolve_run(T.parse_args(["--backend", backend, "--out", str(out), *SMALL, *extra]))


@pytest.mark.parametrize("backend", quick_first(["torch", "jax"]))
def test_replay_taps_and_gradients_are_in_model_order(tmp_path, backend):
    run = resolve(tmp_path / "run", backend, "--set", "fused_qkv=true")
    weights, taps, _, grads = trainer_factory(twin(backend, "trainer").Trainer, run)(run.start()).inspect(run.batch(1))
    parts = ("attn_out", "mlp_out", "residual")
    expected = ["model.embed", *(f"model.layers.{i}.{p}" for i in range(run.spec.L) for p in parts), "model.norm",
                "logits"]
    assert list(taps) == expected
    assert list(grads) == list(weights) == [t.name for t in layout(run.spec)]


def test_fuse_and_split_keep_module_order():
    spec = make_spec(fused_qkv=True, n_layers=3)
    names = [t.name for t in layout(spec)]
    weights = {n: np.zeros(t.shape, np.float32) for n, t in zip(names, layout(spec))}
    fused = fuse_qkv(weights, spec)
    assert (list(fused).index("model.layers.0.self_attn.qkv_proj.weight")
            < list(fused).index("model.layers.0.self_attn.o_proj.weight"))
    assert list(split_qkv(fused, spec)) == names


@pytest.mark.slow
def test_a_diverging_run_names_the_same_first_tensor_in_both_twins(tmp_path):
    """The issue's run (lr=1e30, no warmup, no clipping): torch named model.layers.0.attn_out, JAX named logits."""
    messages = {}
    for backend in ("jax", "torch"):
        run = resolve(tmp_path / backend, backend, "--set", "lr=1e30", "--set", "warmup_steps=0", "--set",
                      "grad_clip=0", "--steps", "4", "--save-every", "1")
        with pytest.raises(NonFiniteError) as e:
            Loop(run, trainer_factory(twin(backend, "trainer").Trainer, run), progress=False)()
        messages[backend] = str(e.value).split("; ")[0]
    assert messages["jax"] == messages["torch"], messages
    assert "activation model.layers.0." in messages["jax"], messages


def test_a_float_batch_to_inspect_is_the_same_token_error_in_both_twins(tmp_path):
    """Trainer.inspect (what the diagnosis replays) checks its batch as `step` does: a float64 batch was refused as
    "float32" by JAX (its taps' forward cast the batch first) and as "float64" by torch."""
    from shared_config.tokens import TokenError

    for backend in ("jax", "torch"):
        run = resolve(tmp_path / backend, backend)
        trainer = trainer_factory(twin(backend, "trainer").Trainer, run)(run.start())
        with pytest.raises(TokenError, match="^a batch must hold integer ids, got dtype float64$"):
            trainer.inspect(run.batch(1).astype(np.float64))


def test_inspect_takes_a_list_of_rows_as_step_does(tmp_path):
    """Trainer.inspect slices its batch as an array: a list of rows, which `step` takes, was a TypeError 'list
    indices must be integers or slices, not tuple' from inside it. Now the array's weights, taps, loss and gradients,
    in both twins."""
    for backend in ("jax", "torch"):
        run = resolve(tmp_path / backend, backend)
        trainer = trainer_factory(twin(backend, "trainer").Trainer, run)(run.start())
        batch = run.batch(1)
        _, taps, loss, grads = trainer.inspect(batch)
        _, taps_rows, loss_rows, grads_rows = trainer.inspect(batch.tolist())  # a tuple takes the same path
        assert loss_rows == loss and taps_rows.keys() == taps.keys() and grads_rows.keys() == grads.keys()
        assert all(np.array_equal(taps_rows[k], taps[k]) for k in taps)
        assert all(np.array_equal(grads_rows[k], grads[k]) for k in grads)
