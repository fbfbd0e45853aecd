"""A conversion cut by a failing write or rename (docs/checkpoints.md): DST exactly as it was (absent or
byte-identical), no temporary file or directory left, one line naming DST."""

import errno
import os
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
import torch

import shared_config.files
import shared_config.formats.safetensors
from shared_config import init_weights, save_checkpoint
from shared_config.resources import ResourceError

from ..support.common import error_line, load_script, make_spec

convert = load_script("convert").convert


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories): to prove nothing changed."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def crash(*args, **kwargs):
    """Write part of the output (every patched writer takes its path second), then fail like a full disk."""
    Path(args[1]).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


# target format: (the module attribute that writes its bytes, DST)
WRITES = {
    "safetensors": ((shared_config.formats.safetensors, "save_file"), "out.safetensors"),
    "torch": ((torch, "save"), "out.pt"),
    "flax": ((ocp.StandardCheckpointer, "save"), "out-flax"),
    "hf": ((shared_config.formats.safetensors, "save_file"), "out-hf"),  # after config.json is written
}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("target", WRITES)
def test_interrupted_conversion_leaves_destination_as_it_was(tmp_path, monkeypatch, target, existing):
    spec = make_spec()
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "m.safetensors"
    save_checkpoint(src, init_weights(spec, 0), spec)
    (owner, writer), name = WRITES[target]
    if existing:
        convert(src, tmp_path / name, to=target)
    before = listing(tmp_path)
    monkeypatch.setattr(owner, writer, crash)
    with pytest.raises(ResourceError) as e:  # the environment's failure, exit code 3
        convert(src, tmp_path / name, to=target, force=True)
    assert error_line(e, tmp_path / name).endswith("cannot write: No space left on device")
    assert listing(tmp_path) == before  # DST absent or byte-identical; no temp file or directory left


@pytest.mark.parametrize("rename", ["exchange", "two-renames"])
def test_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch, rename):
    """The replace's one exchange, or (where the file system lacks it) its second rename, fails."""
    spec = make_spec()
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, init_weights(spec, 0), spec)
    convert(src, tmp_path / "out-hf", to="hf")
    before = listing(tmp_path)
    real_replace = os.replace

    def replace(a, b):  # fail only the rename of the finished temporary directory into place
        if Path(a).is_dir() and str(a).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(a, b)

    def exchange(a, b):
        if rename == "exchange":
            raise OSError(errno.EIO, "Input/output error")
        return False

    monkeypatch.setattr(shared_config.files, "_exchange", exchange)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ResourceError, match="cannot write: Input/output error"):
        convert(src, tmp_path / "out-hf", to="hf", force=True)
    assert listing(tmp_path) == before
