"""Persistent compilation caches for both frameworks in one directory the user names (docs/bench.md: compile
caches): JAX's (jax_compilation_cache_dir) and torch.compile's (inductor's FX-graph cache and the AOT-autograd
cache, under TORCHINDUCTOR_CACHE_DIR). A second run of the same step loads its compiled programs instead of
compiling them again. No framework is imported here: the settings go through the environment variables both
frameworks read at import, and into their config objects where a framework is already imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli import UsageError, check_out_dir, nonempty
from .files import resolved

# JAX's cache is bounded (least recently used entries go), which also turns on its file lock
CACHE_SIZE_BYTES = 4 * 2**30


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/twinlm/compile, or ~/.cache/twinlm/compile (the XDG base directory rule, which also says a
    relative $XDG_CACHE_HOME is invalid and ignored: it put a cache folder in whatever directory the run started in)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "twinlm" / "compile"


def add_compile_cache_option(parser) -> None:
    """--compile-cache DIR|none on an argparse parser (default: default_cache_dir())."""
    parser.add_argument("--compile-cache", type=cache_dir, default=str(default_cache_dir()), metavar="DIR",
                        help="persistent JAX and torch.compile caches here; 'none' (in any case): compile afresh")


def cache_dir(text: str) -> str:
    """argparse's type for --compile-cache: 'none' in any case (`None` made a directory named None), or a directory
    that can be made (check_out_dir), refused at parse time in every tool: a file in the way was found at the first
    compilation, and gpu_check.py, which hands the option to each check, started every check of its plan to fail each
    one with it."""
    text = nonempty(text)
    if text.lower() == "none":
        return "none"
    try:
        check_out_dir("--compile-cache", text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--compile-cache ")) from None
    return text


# what use_compile_cache sets: JAX's flags (and their environment variables, the names in capitals), torch's
# environment variables; where compiled code is kept, not how it is generated
JAX_CACHE_FLAGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                   "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes",
                   "jax_compilation_cache_max_size")
TORCH_CACHE_ENV = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_CACHE_DIR")


def cache_state(directory: Path | None) -> dict:
    """What a report records of the compile cache before its first compilation: {"dir", "entries"}, the files already
    in it (0: cold, every compile_s a full compilation; more: warm, some programs read back), or {"dir": None} off.
    compile_s of two reports compare only at like states."""
    if directory is None:
        return {"dir": None}
    return {"dir": str(directory), "entries": sum(1 for p in Path(directory).rglob("*") if p.is_file())}


def use_compile_cache(directory: str | Path | None) -> Path | None:
    """Turn both frameworks' persistent compilation caches on in `directory` (created; JAX's under jax/, inductor's
    under inductor/), every program cached whatever its size or compile time; None or "none" turns them off. Call
    it before the first compilation. Returns the directory, or None. Raises UsageError for a path with a file in the
    way or without write permission, OSError when it cannot be created all the same."""
    off = directory is None or str(directory) == "none"
    root = None if off else resolved(directory)
    jax_settings = {
        "jax_enable_compilation_cache": not off,
        "jax_compilation_cache_dir": None if off else str(root / "jax"),
        "jax_persistent_cache_min_compile_time_secs": 0.0,  # small programs too: a CPU run compiles in < 1 s
        "jax_persistent_cache_min_entry_size_bytes": -1,  # no size floor
        "jax_compilation_cache_max_size": CACHE_SIZE_BYTES,
    }
    torch_settings = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0" if off else "1",
                      "TORCHINDUCTOR_AUTOGRAD_CACHE": "0" if off else "1"}
    if not off:
        check_out_dir("--compile-cache", root)  # a file in the way: one line naming the option, before any mkdir
        for sub in ("jax", "inductor"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        torch_settings["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")  # read at every cache access
    for name, value in jax_settings.items():
        if value is not None:
            os.environ[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        else:
            os.environ.pop(name.upper(), None)
    os.environ.update(torch_settings)
    if "jax" in sys.modules:  # imported already: its flags were read from the environment then
        _update_jax(jax_settings)
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].fx_graph_cache = not off
    if "torch._functorch.config" in sys.modules:
        sys.modules["torch._functorch.config"].enable_autograd_cache = not off
    return root


def _update_jax(settings: dict) -> None:
    jax = sys.modules["jax"]
    for name, value in settings.items():
        jax.config.update(name, value)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # the next compilation opens the cache at the new directory
