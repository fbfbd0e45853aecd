"""Orbax directories <-> canonical weights and spec (jax, flax and orbax imported only when one is read or
written; the layout table is all this module needs of the model).

A directory holds `spec.json` and `state/`: Orbax's save of the JAX twin's `nnx.state(model, nnx.Param)` as a
nested pure dict, each leaf at its `Tensor.jax_name` (`kernel`/`embedding` for Linear/Embed), transposed where
`Tensor.transposed`, q/k/v fused where the spec fuses them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import CheckpointError, atomic_dir, deferred_signals, write_errors
from ..layout import fuse_qkv, model_layout, split_qkv
from ..limits import MAX_JSON_BYTES, read_capped
from ..resources import ResourceError
from ..spec import ModelSpec
from .checks import (check_layout, check_size, check_weights, held_params, np_dtype, resolve_spec, spec_from_json,
                     stored_fusion)


def save_orbax(path: str | Path, weights: dict, spec: ModelSpec, overwrite: bool = False) -> None:
    """A directory of `state/` (Orbax, the pure dict of the JAX twin's `nnx.state(model, nnx.Param)`) and `spec.json`.

    `weights`: canonical numpy arrays, stored in `spec.param_dtype`. Built under a temporary name and renamed into
    place when complete.
    """
    import orbax.checkpoint as ocp

    check_weights(weights, spec, path, allow_nonfinite=True)
    state = pure_dict(weights, spec)
    with atomic_dir(path, overwrite) as tmp:
        (tmp / "spec.json").write_text(spec.to_json() + "\n")
        # SIGTERM/SIGINT wait for Orbax's threads: an exception raised meanwhile ends in a native abort
        with deferred_signals(), write_errors(path), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.absolute() / "state", state)  # leaving the checkpointer waits for the async save


def read_spec_file(path: Path) -> bytes:
    """spec.json's bytes, refused past the JSON size limit; unreadable is a CheckpointError."""
    try:
        return read_capped(path, MAX_JSON_BYTES, "spec file")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_orbax(path: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (as stored) and spec of a `save_orbax` directory; without `spec.json`, `spec` is required.
    Raises CheckpointError naming the directory and what is wrong."""
    import jax
    import orbax.checkpoint as ocp
    from flax import traverse_util

    path = Path(path)
    spec_file = path / "spec.json"
    # a spec.json there that is no readable file (a directory, a loop of links) is refused, not read as "no spec"
    there = spec_file.exists() or spec_file.is_symlink()
    file_spec = spec_from_json(read_spec_file(spec_file), spec_file) if there else None
    spec = resolve_spec(file_spec, spec, path)
    state_dir = (path / "state").absolute()
    try:  # SIGTERM/SIGINT wait for Orbax's reading threads too (an exception meanwhile is a native abort)
        with deferred_signals(), ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(state_dir).item_metadata
            if stored is None:
                raise CheckpointError(f"{state_dir}: not a readable Orbax checkpoint: no tree metadata")
            stored = stored.tree
            flat = traverse_util.flatten_dict(dict(stored), sep=".")
            layout_spec = stored_fusion(flat, spec)  # q/k/v as the tree holds them, whatever fusion the spec asks for
            # before the layout table of a spec claiming 10^7 layers
            check_size(len(flat), layout_spec, state_dir, fused=True, held=held_params(m.shape for m in flat.values()))
            check_layout(flat, {t.jax_name: t.jax_shape for t in model_layout(layout_spec)}, state_dir)
            # restore as stored (dtype included), on this host's default device
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
            flat = traverse_util.flatten_dict(checkpointer.restore(state_dir, target), sep=".")
    except (CheckpointError, ResourceError):
        raise
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged directory
        raise CheckpointError(f"{state_dir}: not a readable Orbax checkpoint: {orbax_reason(e)}") from None
    return canonical(flat, layout_spec), spec


def orbax_reason(e: BaseException) -> str:
    """The first line of the innermost cause Orbax chains (TensorStore's own, which names the array and the file),
    without the repr of a TensorStore object Orbax appends to its wrapper ("See full TensorStore details: ...")."""
    while (inner := e.__cause__ or e.__context__) is not None:
        e = inner
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first.split(" See full TensorStore details")[0][:500]


def pure_dict(weights: dict, spec: ModelSpec) -> dict:
    """Canonical weights -> the nested pure dict of the JAX twin's NNX state (q/k/v fused, JAX leaves transposed),
    jax arrays in `spec.param_dtype`."""
    import jax.numpy as jnp

    weights = fuse_qkv({k: jnp.asarray(v) for k, v in weights.items()}, spec, jnp.concatenate)
    pure: dict = {}
    for t in model_layout(spec):
        x = weights[t.name].astype(np_dtype(spec.param_dtype))
        node, *parents = pure, *t.jax_name.split(".")[:-1]
        for part in parents:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[t.jax_name.split(".")[-1]] = x.T if t.transposed else x
    return pure


def canonical(flat: dict, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Checked flat leaves (dotted `Tensor.jax_name` -> array) -> canonical numpy weights, torch orientation, q/k/v
    split back, dtypes as stored."""
    weights = {}
    for t in model_layout(spec):
        x = np.asarray(flat[t.jax_name])
        weights[t.name] = x.T if t.transposed else x
    return split_qkv(weights, spec)
