"""The checks every checkpoint format shares (numpy only): the spec a file carries against the given one, the
tensor count before the layout table is built, names, shapes, float dtypes and finite values, all reported at once
and grouped by layer. They raise CheckpointError (shared_config.files).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from ..files import CheckpointError
from ..layout import group_names, layer_of, layout
from ..limits import parse_json, quote
from ..resources import check_memory, gib, layout_size
from ..spec import COMPUTE_FIELDS, ModelSpec, load_spec

def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a spec's float dtype name, "float32" or "bfloat16" (ml_dtypes', imported here, where a file
    needs it: at module level it was most of every tool's start-up, ~0.8 s before an `error:` line or `--help`);
    KeyError for another name."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"float32": np.float32}[name])


def is_float(a: np.ndarray) -> bool:
    """Whether `a` holds floats: a numpy float dtype, or ml_dtypes' bfloat16 (not a numpy.floating subtype)."""
    return a.dtype.name == "bfloat16" or np.issubdtype(a.dtype, np.floating)


def checkpoint_path(src) -> Path:
    """`src` as a Path to read, or a CheckpointError: a path of another type (None, 5), an empty one, one with a NUL
    byte, or one the system cannot look up (a name too long, a loop of links) were a TypeError, a ValueError or a raw
    OSError naming no checkpoint. A path that does not exist is left to the reader ("no such file")."""
    if not isinstance(src, (str, os.PathLike)):  # a Python caller's value, named as Python writes it
        raise CheckpointError(f"a checkpoint path is a str or an os.PathLike, not {type(src).__name__} {src!r:.80}")
    if not str(src):
        raise CheckpointError("an empty path names no checkpoint")
    path = Path(src)
    if "\0" in str(path):
        raise CheckpointError(f"{quote(str(path))}: a path cannot hold a NUL character")
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        raise CheckpointError(f"{quote(str(path))}: cannot look it up: {e.strerror}") from None
    return path


def check_not_pickled(path: Path) -> None:
    """A Hugging Face-style directory whose weights are only transformers' pickles (pytorch_model*.bin) is refused
    naming them: "model.safetensors: no such file" left the user to guess why the weights beside it were not read."""
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return
    if found := sorted(p.name for p in path.glob("pytorch_model*.bin*")):
        raise CheckpointError(f"{path}: holds {found[0]}{', ...' if len(found) > 1 else ''}, transformers' pickle "
                              "format, which is not read (a pickle can run code): only model.safetensors or the "
                              "shards model.safetensors.index.json lists; save it with "
                              "save_pretrained(safe_serialization=True)")


def spec_from_json(text: str | bytes, path: str | Path, what: str = "spec") -> ModelSpec:
    """A spec stored as JSON (file metadata, `spec.json`); a bad one is a CheckpointError naming `path`."""
    try:
        return ModelSpec.from_dict(parse_json(text))  # a mapping only: not a preset name or a path
    except ValueError as e:  # JSON, UTF-8, limit and spec errors are all ValueErrors
        raise CheckpointError(f"{path}: invalid {what}: {e}") from None


def spec_from_metadata(meta: Mapping[str, str], path: str | Path) -> ModelSpec | None:
    return spec_from_json(meta["spec"], path, "spec in metadata") if "spec" in meta else None


def resolve_spec(file_spec: ModelSpec | None, given, path: str | Path) -> ModelSpec:
    """The spec to use: the given one must agree with the file's, except in the compute choices (spec.COMPUTE_FIELDS:
    compute_dtype, fused_qkv), where it is the given spec's to choose; one of them must exist."""
    if given is None:
        if file_spec is None:
            raise CheckpointError(f"{path}: the file carries no spec; pass one (--spec on the command line; "
                                  "spec= in Python: "
                                  "a preset name, YAML path or dict)")
        return file_spec
    spec = load_spec(given)
    if file_spec is not None:
        file_spec = file_spec.replace(**{f: getattr(spec, f) for f in COMPUTE_FIELDS})
    if file_spec is not None and file_spec != spec:  # equal architectures, however their defaults were written
        a, b = file_spec.to_dict(), spec.to_dict()
        diff = "; ".join(f"{k}: file {quote(a[k])} vs given {quote(b[k])}" for k in a if a[k] != b[k])
        raise CheckpointError(f"{path}: spec in the file disagrees with the given spec: {diff}")
    return spec


def held_params(shapes) -> int:
    """The parameters that tensors of these `shapes` (any sequences of ints) hold: `check_size`'s `held`."""
    return sum(math.prod(shape) for shape in shapes)


def stored_fusion(names, spec: ModelSpec) -> ModelSpec:
    """`spec` with `fused_qkv` as a file of the twins' in-memory layout (a `.pt` state dict, an Orbax tree) stores
    q/k/v, read off its tensor `names`: fusion is a compute choice (COMPUTE_FIELDS) that a given spec may change, so a
    file written fused must read under a spec that is not (a bare state dict under any spec), and the other way round.
    A file holding neither name (GLA) or both (damaged: the layout check names it) keeps `spec`'s."""
    fused = any(".self_attn.qkv_proj." in n for n in names)
    # q_proj of an attention layer: a hybrid stack's GLA layers hold theirs either way
    split = any(".self_attn.q_proj." in n and layer_of(n) in spec.attention_layers for n in names)
    if fused == split:
        return spec
    return spec.replace(fused_qkv=fused)


def check_size(found: int, spec: ModelSpec, path: str | Path, fused: bool = False, held: int | None = None) -> None:
    """What every reader checks before it reads a tensor: the tensor count (`check_count`), then that the weights fit
    in memory in float32 (ResourceError): an Orbax directory of 84 KB held 257 MB of zeros (compressed), so a small
    directory could claim any size. The weights are the fewer of the spec's and those the file's tensors `held` (the
    sum of their shapes' products, when the reader knows it): reading takes no more than the file holds, and a spec
    (config.json, metadata) claiming a vocabulary of 10^14 over a file of 97 rows is then refused by the layout check
    naming its shapes (exit code 2), not as a job that "needs a machine with more memory" (exit 3)."""
    params = check_count(found, spec, path, fused)
    params = params if held is None else min(params, held)
    check_memory(4 * params, f"reading {path} ({params:,} parameters)", "it needs a machine with more memory")


def check_count(found: int, spec: ModelSpec, path: str | Path, fused: bool = False) -> int:
    """Refuse a spec that implies far more tensors than the `found` ones, or far fewer, before its layout table is
    built or a tensor read: a spec claiming 10^7 layers is refused in microseconds, where listing its missing keys
    would take minutes.
    Returns the spec's parameter count."""
    tensors, params, _ = layout_size(spec)
    if fused and spec.fused_qkv:
        tensors -= 2 * spec.layer_mixers.get("attention", 0)
    if tensors > 2 * found + 64:
        raise CheckpointError(
            f"{path}: the spec implies {tensors:,} tensors ({spec.L:,} layers, {params:,} parameters, "
            f"{gib(params * np_dtype(spec.param_dtype).itemsize)} GiB) but the file holds {found:,}"
        )
    if found > 2 * tensors + 64:  # the other way: every extra tensor would be read, then listed as unexpected
        raise CheckpointError(f"{path}: the file holds {found:,} tensors but the spec implies {tensors:,} "
                              f"({spec.L:,} layers)")
    return params


# Tensors some writers save that are computed from the spec, never learned: ignored on load with a note, as
# transformers ignores them (transformers < 4.31 saved each Llama layer's RoPE `inv_freq`; later ones one copy).
DERIVED_BUFFERS = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def without_derived(tensors: dict, path: str | Path) -> dict:
    """`tensors` less the known derived buffers (`DERIVED_BUFFERS`), with a one-line note on stderr naming them;
    every other unexpected tensor is left for the layout check to refuse."""
    if not (derived := [n for n in tensors if DERIVED_BUFFERS.fullmatch(n)]):
        return tensors
    print(f"note: {path}: ignoring {len(derived)} derived buffer(s) recomputed from the spec: {group_names(derived)}",
          file=sys.stderr)
    return {n: x for n, x in tensors.items() if n not in derived}


def without_tied_copy(tensors: dict, spec: ModelSpec, path: str | Path,
                      embed: str = "model.embed_tokens.weight") -> dict:
    """`tensors` less `lm_head.weight` when the spec ties it and it is the embedding (`embed`, the file's name for it)
    bit for bit: some tied checkpoints store the shared matrix twice. A copy that differs is refused by name: the
    model computes with one of the two, and which one a reader picks is not the file's to say. A tied file that
    stores the matrix under `lm_head.weight` alone has it read as `embed`, as transformers (5.x) loads it."""
    head, table = tensors.get("lm_head.weight"), tensors.get(embed)
    if not spec.tie_embeddings or head is None:
        return tensors
    if table is None:
        return {(embed if n == "lm_head.weight" else n): x for n, x in tensors.items()}
    same = (table is not None and head.dtype == table.dtype and head.shape == table.shape
            and head.dtype.itemsize in (1, 2, 4, 8)  # compared as unsigned ints: bit for bit, NaN and -0.0 too
            and np.array_equal(*(np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}") for x in (head, table))))
    if not same:
        raise CheckpointError(f"{path}: tie_embeddings is set, but the file's lm_head.weight is not a copy of {embed} "
                              "(a tied model has one matrix): untie the model or drop lm_head.weight")
    return {n: x for n, x in tensors.items() if n != "lm_head.weight"}


def layout_problems(weights: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of `weights` (any array type), grouped by layer."""
    problems = []
    if missing := [n for n in shapes if n not in weights]:
        problems.append(f"missing keys: {group_names(missing)}")
    if unexpected := [n for n in weights if n not in shapes]:
        problems.append(f"unexpected keys: {group_names(unexpected)}")
    wrong = [
        f"{n} expected {list(s)} found {list(weights[n].shape)}"
        for n, s in shapes.items()
        if n in weights and tuple(weights[n].shape) != tuple(s)
    ]
    if wrong:
        problems.append("shape mismatches: " + ", ".join(wrong))
    return problems


def check_layout(weights: Mapping, shapes: Mapping[str, tuple[int, ...]], path: str | Path) -> None:
    """Check a framework's in-memory layout (names and shapes) before converting it to the canonical one."""
    if problems := layout_problems(weights, shapes):
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def check_tensors(
    tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], path: str | Path,
    allow_nonfinite: bool = False,
) -> None:
    """Check numpy `tensors` against the expected names and shapes, float dtypes and (unless allowed) finite
    values; every problem in one error naming `path`. A value that is not an array of a numpy dtype (a list, a torch
    tensor: `.numpy()` it) is named, where its missing `.shape` or its torch dtype would be a TypeError or
    AttributeError."""
    if odd := [n for n, x in tensors.items() if not isinstance(getattr(x, "dtype", None), np.dtype)]:
        raise CheckpointError(f"{path}: not arrays of a numpy dtype (numpy or JAX): "
                              f"{', '.join(f'{quote(n)[1:-1]} ({type(tensors[n]).__name__})' for n in odd[:8])}"
                              f"{', ...' if len(odd) > 8 else ''}")
    problems = layout_problems(tensors, shapes)
    if not_float := [n for n in shapes if n in tensors and not is_float(tensors[n])]:
        problems.append(f"non-float dtypes: {', '.join(f'{n} ({tensors[n].dtype})' for n in not_float)}")
    elif not allow_nonfinite:
        with np.errstate(over="ignore", invalid="ignore"):  # a float64 past float32's range: reported below, not warned
            bad = [n for n in shapes if n in tensors and not np.isfinite(tensors[n].astype(np.float32)).all()]
        if bad:
            problems.append(f"non-finite values (NaN/Inf) in: {group_names(bad)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def check_weights(
    weights: Mapping[str, np.ndarray], spec: ModelSpec, path: str | Path, allow_nonfinite: bool = False
) -> None:
    """Check canonical `weights` against `layout(spec)` (check_tensors), their count first (check_count; they are
    in memory already, so no memory check)."""
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: the weights must be a mapping of tensor names to arrays, not "
                              f"{type(weights).__name__}")
    if odd := [k for k in weights if not isinstance(k, str)]:  # else a TypeError from re, grouping by layer
        raise CheckpointError(f"{path}: tensor names must be str, not {type(odd[0]).__name__} {quote(odd[0])}")
    check_count(len(weights), spec, path)
    check_tensors(weights, {t.name: t.shape for t in layout(spec)}, path, allow_nonfinite)



def check_train_state(state, spec, where: str = "train state") -> None:
    """Refuse (CheckpointError) a canonical train state that is not a mapping of "step" (an integer in 0..2**31-1:
    JAX counts steps in int32) and "weights", "m", "v" (each `check_weights`, non-finite values allowed: the
    non-finite diagnosis reads them). Unchecked, a missing key was a bare KeyError from inside either twin's
    `set_train_state`, None a TypeError, a moment of another shape an error from inside the framework."""
    spec = load_spec(spec)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: a train state must be a mapping with keys step, weights, m, v; not "
                              f"{type(state).__name__}")
    if missing := [k for k in ("step", "weights", "m", "v") if k not in state]:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)} (a train state has step, weights, m, v)")
    step = state["step"]
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < 2**31:
        raise CheckpointError(f"{where}: step={quote(step)} must be an integer in 0..2**31-1")
    for key in ("weights", "m", "v"):
        check_weights(state[key], spec, f"{where} {key}", allow_nonfinite=True)
