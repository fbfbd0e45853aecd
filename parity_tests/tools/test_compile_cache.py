"""Compile time: the persistent compilation caches (shared_config.compile_cache, --compile-cache) and the torch
twin compiled block by block (train.compile_blocks), where identical blocks compile once."""

from __future__ import annotations

import os
import re
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import torch_model
from shared_config import load_train_config
from shared_config.cli import UsageError
from shared_config.compile_cache import default_cache_dir, use_compile_cache
from torch_model import train

from ..support.common import make_spec, parity_weights

JAX_FLAGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


@pytest.fixture
def restored():
    """The environment and JAX's cache flags as they were before the test."""
    import jax
    import torch._functorch.config
    import torch._inductor.config

    env, flags = dict(os.environ), {f: getattr(jax.config, f) for f in JAX_FLAGS}
    fx, autograd = torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache
    yield
    os.environ.clear()
    os.environ.update(env)
    for name, value in flags.items():
        jax.config.update(name, value)
    torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache = fx, autograd


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "twinlm" / "compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(default_cache_dir()) == os.path.expanduser("~/.cache/twinlm/compile")


def test_both_caches_go_to_the_named_directory_or_off(tmp_path, restored):
    import jax
    import torch._functorch.config
    import torch._inductor.config

    assert use_compile_cache(tmp_path / "c") == tmp_path / "c"
    assert (jax.config.jax_compilation_cache_dir == str(tmp_path / "c" / "jax")
            and jax.config.jax_enable_compilation_cache)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0  # small programs are cached too
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache
    f = jax.jit(lambda x: x * 3 + 1)
    f(np.arange(5.0)).block_until_ready()
    assert any(p.name.endswith("-cache") for p in (tmp_path / "c" / "jax").iterdir())  # the program is on disk
    assert use_compile_cache("none") is None
    assert not jax.config.jax_enable_compilation_cache and not torch._inductor.config.fx_graph_cache
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"


def test_a_cache_path_under_a_file_is_refused_by_name(tmp_path, restored):
    """It read "error: FILE/jax: Not a directory", without saying which option named it."""
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(UsageError, match=re.escape(f"--compile-cache {tmp_path / 'afile' / 'sub'}: "
                                                   f"{tmp_path / 'afile'} is a file, not a directory")):
        use_compile_cache(tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "keep"


def test_identical_blocks_compile_once_and_compute_the_eager_step():
    """Three blocks, one compiled graph (a second compile would raise); names unchanged; the eager step's loss."""
    spec = make_spec()
    cfg = load_train_config({"batch_size": 2, "seq_len": 16})
    tokens = np.random.default_rng(0).integers(0, spec.V, (2, 17))
    losses = []
    for compiled in (False, True):
        model = torch_model.from_weights(parity_weights(spec), spec)
        keys = list(model.state_dict())
        if compiled:
            train.compile_blocks(model, backend="aot_eager")
            train.compile_blocks(model, backend="aot_eager")  # twice: a no-op
            assert list(model.state_dict()) == keys
        torch._dynamo.reset()
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
            _, metrics = step(state, tokens)
        assert counters["stats"]["unique_graphs"] == compiled  # one graph for every block
        losses.append(float(metrics["loss"]))
    assert spec.L >= 2 and losses[0] == losses[1]
