"""Loader errors: every problem reported at once, grouped, naming the file; nothing loads half-way."""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import jax_model
import torch_model
from shared_config import CheckpointError, init_weights, save_checkpoint

from ..support.common import make_spec


def jax_sharded(path, spec=None, **options):
    """distributed.from_safetensors on a one-device mesh: the same file checks as the twins' loaders."""
    from jax_model import distributed

    return distributed.from_safetensors(path, distributed.make_mesh(devices=1), spec, **options)


LOADERS = {"jax": jax_model.from_safetensors, "torch": torch_model.from_safetensors, "jax-sharded": jax_sharded}
PRETRAINED = {"jax": jax_model.from_pretrained, "torch": torch_model.from_pretrained}


def write(path, weights, spec=None, **meta):
    metadata = {"spec": spec.to_json()} if spec is not None else {}
    save_file(weights, path, metadata={**metadata, **meta} or None)
    return path


@pytest.fixture
def spec():
    return make_spec(n_layers=3)


@pytest.mark.parametrize("twin", LOADERS)
def test_all_key_and_shape_problems_in_one_error(tmp_path, spec, twin):
    w = init_weights(spec, 0)
    for i in range(3):
        del w[f"model.layers.{i}.mlp.up_proj.weight"]
    w["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    w["lm_head.weight"] = w["lm_head.weight"].T.copy()
    path = write(tmp_path / "bad.safetensors", w, spec)
    with pytest.raises(CheckpointError) as e:
        LOADERS[twin](path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert "missing keys: model.layers.{0..2}.mlp.up_proj.weight" in msg
    assert "unexpected keys: model.layers.0.self_attn.extra.weight" in msg
    assert "lm_head.weight expected [97, 48] found [48, 97]" in msg


@pytest.mark.parametrize("twin", LOADERS)
def test_non_float_and_non_finite(tmp_path, spec, twin):
    w = init_weights(spec, 0)
    w["model.norm.weight"] = np.ones(spec.D, np.int32)
    with pytest.raises(CheckpointError, match=r"non-float dtypes: model.norm.weight \(int32\)"):
        LOADERS[twin](write(tmp_path / "int.safetensors", w, spec))
    w = init_weights(spec, 0)
    w["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan
    w["model.layers.2.mlp.down_proj.weight"][0, 0] = np.inf
    path = write(tmp_path / "nan.safetensors", w, spec)
    with pytest.raises(CheckpointError,
                       match=r"non-finite values \(NaN/Inf\) in: model.layers.\{1..2\}.mlp.down_proj.weight"):
        LOADERS[twin](path)
    LOADERS[twin](path, allow_nonfinite=True)  # explicitly allowed: loads


@pytest.mark.parametrize("twin", LOADERS)
def test_spec_disagreement_missing_spec_and_invalid_spec(tmp_path, spec, twin):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, init_weights(spec, 0), spec)
    with pytest.raises(CheckpointError, match=r"disagrees with the given spec: n_layers: file 3 vs given 2"):
        LOADERS[twin](path, make_spec(n_layers=2))
    assert LOADERS[twin](path, spec.to_dict()).spec == spec  # an agreeing spec is fine
    # the compute choices are the given spec's: the file is the same whether q/k/v run fused, in float32 or bfloat16
    compute = spec.replace(fused_qkv=not spec.fused_qkv, compute_dtype="bfloat16")
    assert LOADERS[twin](path, compute).spec == compute
    with pytest.raises(CheckpointError, match=r"given spec: n_layers: file 3 vs given 2$"):  # named alone
        LOADERS[twin](path, compute.replace(n_layers=2))
    bare = write(tmp_path / "bare.safetensors", init_weights(spec, 0))
    with pytest.raises(CheckpointError, match="carries no spec"):
        LOADERS[twin](bare)
    assert LOADERS[twin](bare, spec).spec == spec
    invalid = tmp_path / "invalid.safetensors"
    save_file(init_weights(spec, 0), invalid, metadata={"spec": json.dumps({**spec.to_dict(), "n_kv_heads": 4})})
    with pytest.raises(CheckpointError, match="invalid spec in metadata: n_kv_heads=4 must divide n_heads=6"):
        LOADERS[twin](invalid)


@pytest.mark.parametrize("twin", LOADERS)
def test_not_a_safetensors_file(tmp_path, twin):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        LOADERS[twin](junk)
    with pytest.raises(CheckpointError, match="no such file"):
        LOADERS[twin](tmp_path / "absent.safetensors")


PATHS = {  # what a path argument may be that names no checkpoint -> what the CheckpointError says
    "None": (None, "a checkpoint path is a str or an os.PathLike, not NoneType None"),  # were TypeErrors
    "int": (5, "a checkpoint path is a str or an os.PathLike, not int 5"),
    "bytes": (b"m.safetensors", "not bytes b'm.safetensors'"),
    "empty": ("", "an empty path names no checkpoint"),  # a ValueError about PosixPath('.') in from_pretrained
    "NUL": ("a\0b.safetensors", "a path cannot hold a NUL character"),
    "too long": ("x" * 300 + ".safetensors", "cannot look it up: File name too long"),  # a raw OSError
}


@pytest.mark.parametrize("twin", LOADERS)
@pytest.mark.parametrize("name", PATHS)
def test_a_path_that_names_no_checkpoint_is_a_checkpoint_error(twin, name):
    path, says = PATHS[name]
    for load in (LOADERS[twin], PRETRAINED[twin.removesuffix("-sharded")]):
        with pytest.raises(CheckpointError, match=re.escape(says)):
            load(path)


@pytest.mark.parametrize("twin", LOADERS)
def test_a_directory_or_a_device_is_named_as_such(tmp_path, twin):
    with pytest.raises(CheckpointError, match="a directory, not a safetensors file"):  # said "no such file"
        LOADERS[twin](tmp_path)
    pretrained = PRETRAINED[twin.removesuffix("-sharded")]
    with pytest.raises(CheckpointError, match="/dev/null: neither a regular file nor a directory"):
        pretrained("/dev/null")  # said "no such file or directory"


@pytest.mark.parametrize("twin", PRETRAINED)
def test_from_weights_names_values_that_are_not_arrays(spec, twin):
    """torch tensors were a TypeError ("Cannot interpret 'torch.float32' as a data type"), lists an AttributeError,
    a list of weights a TypeError from the size check."""
    import torch

    from_weights = {"jax": jax_model.from_weights, "torch": torch_model.from_weights}[twin]
    w = init_weights(spec, 0)
    for wrap, kind in ((torch.as_tensor, "Tensor"), (np.ndarray.tolist, "list")):
        with pytest.raises(CheckpointError, match=f"weights: not arrays of a numpy dtype .numpy or JAX.: "
                                                  f"model.embed_tokens.weight .{kind}.,"):
            from_weights({k: wrap(v) for k, v in w.items()}, spec)
    with pytest.raises(CheckpointError, match="the weights must be a mapping of tensor names to arrays, not list"):
        from_weights(list(w.values()), spec)
    with pytest.raises(CheckpointError, match="^weights: tensor names must be str, not int 5$"):  # re's TypeError
        from_weights({**w, 5: w["model.embed_tokens.weight"]}, spec)


def test_save_is_atomic_and_refuses_bad_weights(tmp_path, spec, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, init_weights(spec, 0), spec)
    before = path.read_bytes()
    w = init_weights(spec, 1)
    del w["model.norm.weight"]
    with pytest.raises(CheckpointError, match="missing keys: model.norm.weight"):
        save_checkpoint(path, w, spec)

    import shared_config.formats.safetensors as io
    from shared_config.resources import ResourceError

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(ResourceError, match="m.safetensors: cannot write: disk full"):  # exit code 3
        save_checkpoint(path, init_weights(spec, 1), spec)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("twin", LOADERS)
def test_a_runs_optimizer_file_is_named_as_such(tmp_path, spec, twin):
    """A run's step directory holds model.safetensors and optimizer.safetensors: the second, passed as the weights,
    was refused as "carries no spec" (and with a spec given, as every m.<name>/v.<name> key unexpected)."""
    from shared_config.run_dir import OPTIMIZER_FILE, save_train_checkpoint

    w = init_weights(spec, 0)
    zeros = {k: np.zeros_like(v) for k, v in w.items()}
    (tmp_path / "run").mkdir()
    step = save_train_checkpoint(tmp_path / "run", {"step": 1, "weights": w, "m": zeros, "v": zeros}, spec, {})
    for given in (None, spec):
        with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: holds a training run's AdamW moments .*"
                                                  r"not model weights; the weights are model\.safetensors beside it$"):
            LOADERS[twin](step / OPTIMIZER_FILE, given)
