"""The persistent compilation caches' process-wide settings, as a test found them and as it leaves them: a tool run
in-process (`compare.main`, scripts/train.py's `main`) turns them on for the whole process (`use_compile_cache`)."""

from __future__ import annotations

import os

from shared_config.compile_cache import JAX_CACHE_FLAGS, TORCH_CACHE_ENV, _update_jax

CACHE_ENV = (*(f.upper() for f in JAX_CACHE_FLAGS), *TORCH_CACHE_ENV, "XDG_CACHE_HOME")
SESSION_SETTINGS: tuple | None = None  # what every test starts from: conftest's session_scratch_env sets it


def cache_settings() -> tuple:
    """The environment variables and config values `use_compile_cache` sets, in JAX and torch."""
    import jax
    import torch._functorch.config
    import torch._inductor.config

    return ({name: os.environ.get(name) for name in CACHE_ENV}, {f: getattr(jax.config, f) for f in JAX_CACHE_FLAGS},
            torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache)


def restore_cache_settings(settings: tuple) -> None:
    """Put back what `cache_settings` returned; JAX reopens its cache where the flags now say."""
    import torch._functorch.config
    import torch._inductor.config

    env, flags, torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache = settings
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _update_jax(flags)  # use_compile_cache's own: the flags, then the cache reopened where they say
