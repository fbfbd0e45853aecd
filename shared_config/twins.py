"""The twin of a framework, by name: how a tool that runs either twin gets it ("jax" -> jax_model, "torch" ->
torch_model), so that one answer to "JAX or PyTorch?" serves every tool.

The twin is imported when asked for, by name (importlib): this module imports neither twin itself, and a tool
that runs one twin starts one framework.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .config_file import did_you_mean

TWINS = {"jax": "jax_model", "torch": "torch_model"}  # framework name: its twin's package


def twin(name: str, module: str | None = None) -> ModuleType:
    """The twin package of framework `name` ("jax" or "torch"), or its submodule `module` ("generate", "train",
    "attention", ...), imported on first use. Raises ValueError for another name."""
    if name not in TWINS:
        raise ValueError(f"no twin {name!r}: one of {', '.join(TWINS)}{did_you_mean(name, TWINS)}")
    return importlib.import_module(TWINS[name] if module is None else f"{TWINS[name]}.{module}")
