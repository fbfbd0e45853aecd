"""The train config: presets, YAML round trip, one test per validation rule; which tensors are
weight-decayed; the deterministic batches both twins read."""

import dataclasses
import re

import numpy as np
import pytest
import yaml

from shared_config import (
    SpecError, TrainConfig, decays, load_spec, load_train_config, model_layout, synthetic_batch, train_preset_names,
)

from ..support.common import make_spec


def test_presets_and_defaults():
    assert {"cpu", "parity"} <= set(train_preset_names())
    cpu = load_train_config("cpu")
    assert cpu.steps == 200 and cpu.seq_len <= load_spec("tiny").max_seq_len
    assert load_train_config(None) == TrainConfig() and load_train_config(cpu) is cpu
    assert cpu.beta2 == TrainConfig().beta2  # a preset only sets what differs from the defaults


def test_yaml_keys_are_exactly_the_fields_and_round_trip(tmp_path):
    cfg = TrainConfig(lr=1e-3, schedule="linear", grad_clip=0.0, compute_dtype="bfloat16")
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_train_config(path) == cfg and load_train_config(str(path)) == cfg
    assert load_train_config({"lr": "1e-3"}).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize("changes,message", [
    ({"learning_rate": 1e-3}, "unknown train config key 'learning_rate'"),
    ({"warmup": 5}, "unknown train config key 'warmup' (did you mean 'warmup_steps'?)"),
    ({"lr": 0}, "lr=0.0 must be > 0"),
    ({"lr": "fast"}, "lr='fast' must be a finite number"),
    ({"beta2": 1.0}, "beta2=1.0 must be in [0, 1)"),
    ({"eps": -1e-8}, "eps=-1e-08 must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be >= 0"),
    ({"grad_clip": -1}, "grad_clip=-1.0 must be >= 0"),
    ({"schedule": "step"}, "schedule='step' must be one of constant, cosine, linear"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5 must be in [0, 1]"),
    ({"warmup_steps": 20, "steps": 10}, "warmup_steps=20 must be <= steps=10"),
    ({"steps": 2.5}, "steps=2.5 must be an integer"),
    ({"batch_size": 0}, "batch_size=0 must be > 0"),
    ({"decay_embeddings": "yes"}, "decay_embeddings='yes' must be true or false"),
    ({"compute_dtype": "float16"}, "compute_dtype='float16' must be one of float32, bfloat16"),
    ({"grad_accum_steps": 3}, "grad_accum_steps=3 must be >= 1 and divide batch_size=8"),
    ({"grad_accum_steps": 0}, "grad_accum_steps=0 must be >= 1"),
    ({"remat": "all"}, "remat='all' must be one of none, block, full"),
    ({"loss_chunk": -1}, "loss_chunk=-1 must be >= 0"),
])
def test_each_rule_names_field_value_and_rule(changes, message):
    with pytest.raises(SpecError) as e:
        load_train_config(changes)
    assert message in str(e.value)


def test_bad_sources(tmp_path):
    with pytest.raises(SpecError, match="no train config preset or file named 'nope'"):
        load_train_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_train_config(bad)
    with pytest.raises(SpecError, match="a train config is given as a preset name, a YAML path or a mapping of keys, "
                                        "not int 5"):
        load_train_config(5)  # was a TypeError from Path()
    with pytest.raises(SpecError, match="lr=1000.*must be a finite number"):
        load_train_config({"lr": 10**400})  # was an OverflowError


def test_numpy_scalars_are_read_as_the_numbers_they_are():
    cfg = load_train_config({"steps": np.int64(500), "batch_size": np.int32(4), "lr": np.float32(1e-3)})
    assert (type(cfg.steps), type(cfg.lr)) == (int, float) and cfg.steps == 500 and cfg.batch_size == 4


def test_model_spec_override_and_seq_len_check():
    spec = load_spec("tiny")
    assert TrainConfig(seq_len=64).model_spec(spec) == spec
    assert TrainConfig(seq_len=64, compute_dtype="bfloat16").model_spec(spec).compute_dtype == "bfloat16"
    with pytest.raises(SpecError, match="seq_len=512 must be <= the spec's max_seq_len=256"):
        TrainConfig(seq_len=512).model_spec(spec)
    for kernel in ("pure", "pallas", "fla"):  # a kernel for layers the spec does not have: refused, not ignored
        with pytest.raises(SpecError, match=f"gla_kernel={kernel} picks the GLA layers' kernel; the spec's mixer "
                                            "is attention"):
            TrainConfig(seq_len=64, gla_kernel=kernel).model_spec(spec)
    assert TrainConfig(seq_len=64, gla_kernel="pure").model_spec(load_spec("gla-tiny")).mixer == "gla"
    routed = spec.replace(routing="mod", routing_capacity=0.125)  # floor(0.125 x 4) = 0: routed blocks never ran
    with pytest.raises(SpecError, match=re.escape("routing_capacity=0.125 of seq_len=4 routes floor(0.125 x 4) = 0 "
                                                  "tokens a sequence: the routed blocks would never run or learn")):
        TrainConfig(seq_len=4).model_spec(routed)
    assert TrainConfig(seq_len=8).model_spec(routed) == routed


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_goes_to_matrices_only(decay_embeddings):
    spec = make_spec(norm_type="derf", norm_placement="peri", norm_bias=True, embed_scale="learnable",
                     qk_norm=True, position="learned")
    cfg = TrainConfig(decay_embeddings=decay_embeddings)
    decayed = {t.name.rsplit(".", 2)[-2] for t in model_layout(spec) if decays(t, cfg)}
    matrices = {"qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert decayed == matrices | ({"embed_tokens", "embed_positions"} if decay_embeddings else set())


def test_batches_are_a_pure_function_of_seed_and_step():
    a = synthetic_batch(3, 7, 4, 32, 97)
    assert a.shape == (4, 33) and a.dtype == np.int32 and a.min() >= 0 and a.max() < 97
    assert np.array_equal(a, synthetic_batch(3, 7, 4, 32, 97))
    assert not np.array_equal(a, synthetic_batch(3, 8, 4, 32, 97))
    assert not np.array_equal(a, synthetic_batch(4, 7, 4, 32, 97))
    # learnable: every token has at most 4 successors, fixed by the seed across steps
    pairs = np.concatenate([synthetic_batch(3, s, 4, 32, 97) for s in range(20)], axis=0)
    successors = {}
    for prev, nxt in zip(pairs[:, :-1].ravel(), pairs[:, 1:].ravel()):
        successors.setdefault(prev, set()).add(nxt)
    assert max(len(s) for s in successors.values()) <= 4



BAD_BATCHES = {  # a train batch -> what the TokenError says
    "target past the vocabulary": (lambda b: np.concatenate([b[:, :-1], np.full((2, 1), 97)], 1), "token id 97 is"),
    "input past the vocabulary": (lambda b: np.concatenate([np.full((2, 1), 97), b[:, 1:]], 1), "token id 97 is"),
    "negative, not IGNORE_INDEX": (lambda b: np.where(b == b[0, 3], -1, b), "token id -1 is outside"),
    "float": (lambda b: b.astype(np.float32), "a batch must hold integer ids, got dtype float(32|64)"),  # 64: lists
    "one token a row": (lambda b: b[:, :1], r"a batch of shape \[2, 1\]: needs at least one row of 2 tokens$"),
}


@pytest.fixture(scope="module")
def train_twins():
    import jax_model
    import jax_model.train as J
    import torch_model
    import torch_model.train as P
    from shared_config import init_weights

    from ..support.common import make_spec

    spec = make_spec(n_layers=1)
    cfg = load_train_config({"batch_size": 2, "seq_len": 8, "steps": 2, "warmup_steps": 0})
    w = init_weights(spec, 0)
    return spec, cfg, [(J, jax_model.from_weights(w, spec)), (P, torch_model.from_weights(w, spec))]


@pytest.mark.parametrize("arrays", ["numpy", "the twin's own", "lists"])
@pytest.mark.parametrize("name", BAD_BATCHES)
def test_a_bad_batch_is_the_same_token_error_in_every_step_of_both_twins(train_twins, name, arrays):
    """A target past the vocabulary was a NaN loss (and a finite update) in JAX's jitted step and an IndexError in
    torch's; a float batch was refused by JAX and truncated by torch's `.long()`. A JAX array or a torch tensor on
    the CPU holds its ids at hand as numpy does: such a batch with a target past the vocabulary was still a NaN loss
    in JAX and a RuntimeError about an index in torch; so was a batch of lists of ids."""
    import jax.numpy as jnp
    import torch

    from shared_config import synthetic_batch
    from shared_config.tokens import TokenError

    spec, cfg, twins = train_twins
    make, says = BAD_BATCHES[name]
    numpy_batch = make(synthetic_batch(0, 0, 2, 8, spec.V))  # [2, 9]
    for (train, model), own in zip(twins, (jnp.asarray, torch.as_tensor)):
        batch = {"numpy": numpy_batch, "lists": numpy_batch.tolist()}.get(arrays, own(numpy_batch))
        state = train.init_train_state(model, cfg)
        for run in (lambda: train.make_train_step(model, cfg)(state, batch), lambda: train.loss_and_grads(model, batch),
                    lambda: train.make_eval_step(model)(state, batch)):
            with pytest.raises(TokenError, match=says):
                run()


@pytest.mark.parametrize("shape", [(1, 9), (2, 8), (2, 9, 1)])
def test_a_mask_of_another_shape_is_refused_by_every_step_of_both_twins(train_twins, shape):
    """A mask must have the tokens' shape [B, N]: one of [1, N] weighted every row by row 0's mask without a word
    (both twins broadcast it), others failed inside the framework (TypeError, RuntimeError)."""
    from jax_model import distributed
    from shared_config import synthetic_batch
    from shared_config.tokens import TokenError

    spec, cfg, twins = train_twins
    batch, mask = synthetic_batch(0, 0, 2, 8, spec.V), np.ones(shape, np.float32)  # batch [2, 9]
    says = rf"mask_BN of shape \[{', '.join(map(str, shape))}\] must have the tokens' shape \[2, 9\]"
    for train, model in twins:
        state = train.init_train_state(model, cfg)
        for run in (lambda: train.make_train_step(model, cfg)(state, batch, mask),
                    lambda: train.make_train_step(model, cfg)(state, batch, mask_BN=mask),
                    lambda: train.loss_and_grads(model, batch, mask),
                    lambda: train.make_eval_step(model)(state, batch, mask)):
            with pytest.raises(TokenError, match=says):
                run()
    _, step = distributed.parallelize(twins[0][1], cfg, distributed.make_mesh(devices=1))
    with pytest.raises(TokenError, match=says):
        step(None, batch, mask)


def test_ignored_targets_are_not_ids(train_twins):
    from shared_config import synthetic_batch

    spec, _, twins = train_twins
    ignored = np.where(np.arange(9) < 4, -100, synthetic_batch(0, 0, 2, 8, spec.V))  # IGNORE_INDEX: not predicted
    assert np.isfinite(twins[1][0].loss_and_grads(twins[1][1], ignored)[0])


def test_a_bad_batch_is_refused_by_the_sharded_jax_step_before_sharding(train_twins):
    """The mesh's step checks the global batch (every process holds it), as torch's ranks do, before any collective."""
    from jax_model import distributed
    from shared_config.tokens import TokenError

    spec, cfg, twins = train_twins
    _, step = distributed.parallelize(twins[0][1], cfg, distributed.make_mesh(devices=1))
    with pytest.raises(TokenError, match="token id 97 is outside the vocabulary"):
        step(None, np.full((2, 9), 97))


@pytest.mark.parametrize("cfg", [None, {"lr": 1e-3}, "cpu", 5])
def test_a_train_config_is_what_load_train_config_takes_in_both_twins(train_twins, cfg):
    """make_train_step, init_train_state and loss_and_grads read the config's fields: a dict, None or a preset name
    was an AttributeError ('dict' object has no attribute 'decay_embeddings'; torch's step: 'remat'). They take what
    load_train_config takes, as from_weights takes what load_spec takes; None and anything else is a SpecError."""
    from shared_config import load_train_config, synthetic_batch

    spec, _, twins = train_twins
    batch = synthetic_batch(0, 0, 2, 8, spec.V)
    for train, model in twins:
        runs = [lambda: train.init_train_state(model, cfg), lambda: train.make_train_step(model, cfg)]
        if cfg is not None:  # loss_and_grads' default: no config (no routing losses, no accumulation)
            runs.append(lambda: train.loss_and_grads(model, batch, cfg=cfg))
        if cfg in (None, 5):
            for run in runs:
                with pytest.raises(SpecError, match="^cfg is None: give a TrainConfig" if cfg is None else
                                   "^a train config is given as a preset name, a YAML path or a mapping of keys"):
                    run()
            continue
        assert runs[0]() is not None and callable(runs[1]())  # not stepped: JAX's step donates the shared model
        assert runs[2]()[0] == train.loss_and_grads(model, batch, cfg=load_train_config(cfg))[0]


@pytest.mark.parametrize("count", [0, -1, float("nan"), np.float32("inf"), "8", True])
def test_a_count_that_is_not_a_positive_number_is_refused_by_both_twins(train_twins, count):
    """The divisor of the summed loss: 0 was an inf loss, -1 a negative loss (and a different one in each twin), NaN a
    NaN loss, all without a word; "8" a TypeError from inside each framework."""
    from shared_config import synthetic_batch
    from shared_config.tokens import TokenError

    spec, cfg, twins = train_twins
    batch = synthetic_batch(0, 0, 2, 8, spec.V)
    for train, model in twins:
        state = train.init_train_state(model, cfg)
        for run in (lambda: train.make_train_step(model, cfg)(state, batch, None, count),
                    lambda: train.make_train_step(model, cfg)(state, batch, count=count),
                    lambda: train.loss_and_grads(model, batch, count=count)):
            with pytest.raises(TokenError, match=r"^count=.* must be a finite number > 0"):
                run()


def test_a_batch_of_the_other_twin_or_a_mask_of_strings_is_refused_by_both_twins(train_twins):
    """A torch tensor was a TypeError from inside jax.jit in JAX's step, where torch's read a JAX array; a mask of
    strings a TypeError from inside each framework."""
    import jax.numpy as jnp
    import torch

    from shared_config import synthetic_batch
    from shared_config.tokens import TokenError

    spec, cfg, twins = train_twins
    batch = synthetic_batch(0, 0, 2, 8, spec.V)
    for (train, model), other in zip(twins, (torch.as_tensor, jnp.asarray)):
        state = train.init_train_state(model, cfg)
        with pytest.raises(TokenError, match="^a batch must be integer ids .*, not (torch.Tensor|jaxlib.ArrayImpl)$"):
            train.make_train_step(model, cfg)(state, other(batch))
        with pytest.raises(TokenError, match="^a batch must be integer ids"):
            train.loss_and_grads(model, other(batch))
        with pytest.raises(TokenError, match="^mask_BN must hold numbers"):
            train.loss_and_grads(model, batch, np.full(batch.shape, "a"))
