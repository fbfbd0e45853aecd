"""The train config: presets, YAML round trip, one test per validation rule; which tensors are
weight-decayed; the deterministic batches both twins read."""

import dataclasses

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
