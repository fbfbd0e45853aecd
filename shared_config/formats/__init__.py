"""Every checkpoint format a user may hand over, read into canonical weights and a spec: one dispatch read by
both twins' `from_pretrained`, scripts/convert.py, generate.py --weights and train.py --init-from.

    model.safetensors                   the canonical file (spec in its metadata)         safetensors.py
    runs/x/step-00000400/               a training run's checkpoint: its model.safetensors
    model.pt / .pth                     torch state dict (needs torch)                    torch_pt.py
    model-flax/  (state/, spec.json)    Orbax directory (needs jax and orbax)             orbax.py
    model-hf/    (config.json, ...)     Hugging Face directory                            hf.py
    model-fla/   (config.json, model_type gla)  flash-linear-attention's GLA directory    fla.py

One module per format, each a reader and a writer; checks.py holds the checks they share. The frameworks are
imported only when their format is read or written, so that reading a canonical file or a Hugging Face
directory loads neither framework.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..config_file import did_you_mean
from ..files import CheckpointError, read_json, restore_old
from ..spec import ModelSpec
from . import fla, hf, orbax, torch_pt
from .checks import check_weights, checkpoint_path
from .safetensors import load_checkpoint, metadata

FORMATS = ("safetensors", "torch", "flax", "hf", "fla")
SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
DIRECTORIES = ("flax", "hf", "fla")
RUN_CHECKPOINT = "model.safetensors"  # the weights inside a run's step-NNNNNNNN/ directory (shared_config.run_dir)


def source_format(src: Path) -> str:
    """A directory's format by its contents, a file's by its extension."""
    src = Path(src)
    if src.is_dir():
        # flash-linear-attention's GLA (model_type gla), else Hugging Face; a config.json that is no readable file (a
        # directory, a dangling link) is refused by read_json, not passed over for the weights' own spec
        if os.path.lexists(src / "config.json"):
            return "fla" if read_json(src / "config.json").get("model_type") == "gla" else "hf"
        if (src / "state").is_dir():
            return "flax"
        if (src / RUN_CHECKPOINT).is_file():
            return "safetensors"  # a run's checkpoint directory: read as its model.safetensors
        if found := sorted(p.name for p in src.glob("*.safetensors*")):  # sharded weights or their index.json
            raise CheckpointError(no_config(src, found))
        if steps := sorted(p for p in src.glob("step-*") if (p / RUN_CHECKPOINT).is_file()):  # a run's directory
            raise CheckpointError(f"{src}: a training run's directory, not one checkpoint; pass one of its "
                                  f"step directories, e.g. the latest: {steps[-1]}")
        raise CheckpointError(f"{src}: neither a Hugging Face directory (config.json), an Orbax one (state/) "
                              f"nor a run's checkpoint ({RUN_CHECKPOINT})")
    if not src.is_file():
        what = "neither a regular file nor a directory" if src.exists() else "no such file or directory"
        raise CheckpointError(f"{src}: {what}")
    if src.suffix not in SUFFIXES:
        raise CheckpointError(f"{src}: unknown file extension '{src.suffix}'{did_you_mean(src.suffix, SUFFIXES, 0.6)} "
                              f"({', '.join(SUFFIXES)} or a directory)")
    return SUFFIXES[src.suffix]


def no_config(src: Path, found: list[str]) -> str:
    return (f"{src}: no config.json: a Hugging Face directory needs its config.json beside the weights (found "
            f"{', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); a run's checkpoint directory has state.json")


def _read_safetensors(path: Path, spec):
    if path.is_dir():  # a run's checkpoint, or a Hugging Face directory that lost its config.json
        if spec is None and not (path / "state.json").is_file() and "spec" not in metadata(path / RUN_CHECKPOINT):
            raise CheckpointError(no_config(path, [RUN_CHECKPOINT]))
        path = path / RUN_CHECKPOINT
    return load_checkpoint(path, spec, allow_nonfinite=True)  # NaN/Inf: checked by the caller


# (path, spec or None) -> (canonical weights as stored, spec): each format's one reader.
READERS = {
    "safetensors": _read_safetensors,
    "torch": torch_pt.load_state_dict_file,
    "flax": orbax.load_orbax,
    "hf": hf.read_hf,
    "fla": fla.read_fla,
}


def read_any(src: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec, str]:
    """Canonical weights as stored, the spec and the source format of a checkpoint in any format; names,
    shapes and float dtypes checked, values not (NaN/Inf: `read_checkpoint`)."""
    src = checkpoint_path(src)
    restore_old(src)  # a directory whose replace was killed between its renames is read, not "no such file"
    source = source_format(src)
    weights, spec = READERS[source](src, spec)
    check_weights(weights, spec, src, allow_nonfinite=True)
    return weights, spec, source


def read_checkpoint(src: str | Path, spec=None,
                    allow_nonfinite: bool = False) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights and spec from a checkpoint in any format, everything checked; a bad one is a
    CheckpointError naming the file and what is wrong."""
    weights, spec, _ = read_any(src, spec)
    check_weights(weights, spec, src, allow_nonfinite)
    return weights, spec


def quiet_libraries() -> None:
    """For command-line tools: keep stderr to our one line. Orbax warns through absl, and on a damaged
    checkpoint its async reads fail again on a closed event loop after we have reported the error; on a full
    disk its writers' gathered futures are logged by asyncio ("exception was never retrieved") as they are freed.
    A Ctrl-C or SIGTERM swallowed where Python can only print it (jax's gc callback) still goes to the hook set
    before (cli.run's, which delivers it again): silenced with the rest, the interrupted run went on to exit 0."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def quiet(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)

    if getattr(previous, "__name__", "") != "quiet":  # called twice: one wrapper, not a chain
        sys.unraisablehook = quiet
