"""The faults folder's shared fixture: a canonical checkpoint file to damage, convert or read."""

from pathlib import Path

import pytest

from shared_config import init_weights, save_checkpoint

from ..support.common import make_spec


@pytest.fixture
def canonical(tmp_path) -> Path:
    spec = make_spec()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, init_weights(spec, 0), spec)
    return path
