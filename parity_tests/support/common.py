"""Helpers shared by the parity tests: test specs, test weights with O(1) logits, running both twins."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model
import torch_model
from shared_config import ModelSpec, init_weights, layout, load_spec, read_safetensors, save_checkpoint
from shared_config.parity import FORWARD_TOL, rel_err  # noqa: F401  (the tests import them from here)
from shared_config.placement import PLACEMENTS

from . import reference

ROOT = Path(__file__).resolve().parents[2]  # the checkout under test, wherever it lives

# Distinct, prime-ish sizes so that a wrong transpose or reshape cannot pass; GQA with G = 3.
BASE = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, max_seq_len=128)


# The changes to BASE that make a valid spec of each token mixer (its rules in shared_config/spec.py). The grids that
# must hold every mixer start from these rows (test_logits, test_grads, test_kv_cache, test_convert, ...); a mixer
# added to CHOICES["mixer"] fails test_spec.py's `test_every_mixer_has_a_base_spec` until it has its row.
MIXERS = {
    "attention": {},
    "gla": dict(mixer="gla", position="none", n_kv_heads=None, n_heads=4, gla_gate_rank=5, gla_expand_v=1.25),
}
# A hybrid stack (docs/gla.md, "Hybrid stacks"): GLA, softmax attention with RoPE, GLA (gla_attention_every 2 of 3
# layers: attention between two GLA layers, so that either kind reads the other's output). The grids that hold a
# hybrid start from it.
HYBRID = {**MIXERS["gla"], "n_layers": 3, "gla_attention_every": 2, "position": "rope"}
# A hybrid whose attention layer groups its keys (Qwen3-Next's 16 query heads to 2 key/value heads; fla's
# `attn.num_kv_heads`): 4 query heads share 2 key/value heads (G = 2); the GLA layers keep their 4 heads.
HYBRID_GQA = {**HYBRID, "n_kv_heads": 2}


def make_spec(**changes) -> ModelSpec:
    return load_spec({**BASE, **changes})


def parity_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical weights whose logits are O(1) and whose norm parameters are far from their init.

    Init-valued norms (weight 1, bias 0, shift 0) would hide a dropped weight, bias or shift, and
    0.02-std matmuls give tiny logits that any tolerance passes; moderately larger weights keep the
    model out of the chaotic regime where float32 rounding itself grows past the tolerance.
    """
    w = init_weights(spec.replace(init_std=0.08, embed_init_std=0.3, param_dtype="float32"), seed)
    rng = np.random.default_rng(seed + 1)
    for t in layout(spec):
        x = w[t.name]
        if t.init == "ones":
            x = 1 + 0.2 * rng.standard_normal(t.shape)
        elif t.init == "zeros":
            x = 0.1 * rng.standard_normal(t.shape)
        elif t.name.endswith(".alpha"):
            x = x * rng.uniform(0.8, 1.6, t.shape)
        elif t.name.endswith(".shift"):
            x = rng.uniform(-0.3, 0.3, t.shape)
        elif t.name == "model.embed_scale":
            x = x * rng.uniform(0.2, 0.4, t.shape)  # keep embeddings O(1) after the sqrt(D) scale
        w[t.name] = x.astype(np.float32)
    return unit_logits(w, spec, seed)


def unit_logits(w: dict, spec: ModelSpec, seed: int = 0) -> dict:
    """`w` with the last norm's affine scaled so that the float64 reference's logits have std 1 (the head reads that
    norm's output: `model.norm`, or without one (PLACEMENTS' final_norm) the last block's post-MLP norm)."""
    last = ("model.norm" if PLACEMENTS[spec.norm_placement].final_norm
            else f"model.layers.{spec.L - 1}.post_attention_layernorm")
    c = 1.0 / reference.forward(w, spec, tokens(spec, 2, 32, seed=seed)).std()
    for leaf in ("weight", "bias"):
        if f"{last}.{leaf}" in w:
            w[f"{last}.{leaf}"] = (w[f"{last}.{leaf}"] * c).astype(np.float32)
    return w


def tokens(spec: ModelSpec, batch: int = 2, seq: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.V, (batch, seq))


def jax_logits(weights, spec, toks, attention="auto", taps=None) -> np.ndarray:
    model = jax_model.from_weights(weights, spec, attention)
    return np.asarray(model(jnp.asarray(toks), taps=taps))


def torch_logits(weights, spec, toks, attention="auto", taps=None) -> np.ndarray:
    model = torch_model.from_weights(weights, spec, attention)
    with torch.no_grad():
        return model(torch.as_tensor(toks), taps=taps).numpy()


def ref_logits(weights, spec, toks, taps=None) -> np.ndarray:
    return reference.forward(weights, spec, toks, taps)


def jax_steps(model, toks, prompt: int, start_B=None) -> tuple[np.ndarray, object]:
    """Decoding `toks` [B, T] with a cache, as generation does: logits [B, T, V], the first `prompt` positions' from
    one prefill call, then one `Decoder.decode_step` per token; and the last cache. `start_B` [B]: each row's left
    padding. Any mixer: the cache holds each layer's own state (block.empty_state)."""
    from flax import nnx

    from jax_model.generate import Decoder

    decoder, cache = Decoder(model), model.init_cache(toks.shape[0], toks.shape[1], start_B)
    # Every prompt position, not only the last; jitted, as op-by-op JAX compiles a kernel per op and shape.
    prefill, cache = nnx.jit(lambda m, t, c: m(t, cache=c))(model, jnp.asarray(toks[:, :prompt]), cache)
    steps = [np.asarray(prefill)]
    for t in range(prompt, toks.shape[1]):
        logits_BV, cache = decoder.decode_step(toks[:, t], cache)
        steps.append(np.asarray(logits_BV)[:, None])
    return np.concatenate(steps, axis=1), cache


@torch.no_grad()
def torch_steps(model, toks, prompt: int, start_B=None) -> tuple[np.ndarray, object]:
    """`jax_steps` of the torch twin."""
    from torch_model.generate import Decoder

    decoder, cache = Decoder(model), model.init_cache(toks.shape[0], toks.shape[1], start_B)
    prefill, cache = model(torch.as_tensor(toks[:, :prompt]), cache=cache)
    steps = [prefill.numpy()]
    for t in range(prompt, toks.shape[1]):
        logits_BV, cache = decoder.decode_step(toks[:, t], cache)
        steps.append(logits_BV.numpy()[:, None])
    return np.concatenate(steps, axis=1), cache


def file_bytes_equal(a, b):
    """Two canonical files hold the same metadata, tensor names, dtypes and bytes."""
    wa, ma = read_safetensors(a)
    wb, mb = read_safetensors(b)
    assert ma == mb and list(wa) == list(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and np.array_equal(wa[k].view(np.uint8), wb[k].view(np.uint8)), k


def load_script(name: str):
    """A module of scripts/ (not a package), imported from this checkout by path."""
    module_spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up there
    module_spec.loader.exec_module(module)
    return module


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that imports this checkout (not an installed copy), offline; `extra` added."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


def run_python(*args, **env: str) -> subprocess.CompletedProcess:
    """`python args...` in a subprocess of `checkout_env(**env)`, output captured.

    It runs in an empty scratch directory, never the checkout: a default output (`runs/tiny`) a test forgot
    to redirect lands there, and nothing a user left in the checkout can change a test's outcome.
    """
    cmd = [sys.executable, *map(str, args)]
    cwd = tempfile.mkdtemp(prefix="twinlm-cwd-")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=checkout_env(**env), cwd=cwd, timeout=600)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def run_main(main, *args, capsys):
    """A tool's `main` in this process, as its command line runs it (shared_config.cli.run: parsing, the run, exit
    code 0), without a new interpreter starting both frameworks again; its captured stdout and stderr."""
    from shared_config.cli import run

    with pytest.raises(SystemExit) as e:
        run(main, [str(a) for a in args])
    printed = capsys.readouterr()
    assert e.value.code == 0, printed.err[-3000:]
    return printed


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """Run scripts/{name}.py in a subprocess that imports this checkout, offline."""
    return run_python(ROOT / "scripts" / f"{name}.py", *args)


# torchrun with 2 local processes; standalone: it picks a free port itself
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert a CLI's usage-error contract: exit code 2, nothing on stdout, one stderr line "error: ..." holding
    every fragment (no traceback); that line."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    assert result.stdout == "", result.stdout[-3000:]
    return lines[0]


def one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """A CLI's error contract: exit `code`, one stderr line "error: ..." holding every fragment, no traceback."""
    assert result.returncode == code, f"exit {result.returncode}: {result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def error_line(exc_info, path) -> str:
    """The raised error's message: one line that begins with the offending path."""
    msg = str(exc_info.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


def run_limited(script: str, *args, fsize: int | None = None, memory: int | None = None, cwd=None):
    """scripts/SCRIPT.py (or bench/...) in a subprocess whose files may not grow past `fsize` bytes (a full disk,
    as EFBIG) and whose address space is capped at `memory` bytes."""

    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    path = ROOT / script if "/" in script else ROOT / "scripts" / f"{script}.py"
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          env=checkout_env(), cwd=cwd, timeout=600, preexec_fn=limit)


def peak_memory(fn) -> tuple[BaseException | None, int]:
    """(what `fn()` raised, the peak bytes Python and numpy allocated meanwhile)."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except BaseException as e:  # noqa: BLE001 (returned to the test)
        raised = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def safetensors_file(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def with_metadata_spec(src: Path, dst: Path, spec_text: str) -> Path:
    """A copy of the canonical file `src` whose metadata spec is replaced by `spec_text` (tensors unchanged)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["spec"] = spec_text
    return safetensors_file(dst, json.dumps(header).encode(), raw[8 + n :])


def fla_dir(tmp_path, **edits) -> Path:
    """A flash-linear-attention GLA directory of gla-tiny with config.json `edits` (None: the key deleted)."""
    spec = load_spec("gla-tiny")
    save_checkpoint(tmp_path / "g.safetensors", init_weights(spec, 0), spec)
    load_script("convert").convert(tmp_path / "g.safetensors", tmp_path / "fla", to="fla")
    config = json.loads((tmp_path / "fla" / "config.json").read_text())
    config.update(edits)
    (tmp_path / "fla" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return tmp_path / "fla"


def bench_module(name: str):
    """bench/NAME.py, imported as the package module (bench.NAME), once its test needs it."""
    return importlib.import_module(f"bench.{name}")


def case_ids(cases: list[dict]) -> list[str]:
    """pytest ids for parametrised spec changes: key=value joined by '-', or "base" for no change."""
    return ["-".join(f"{k}={v}" for k, v in c.items()) or "base" for c in cases]


def interleaved_rope(x_BTHE, cos_TE, sin_TE):
    """Meta's pairs (2i, 2i+1) instead of Hugging Face's (i, i + E/2): the classic porting bug, planted into the
    torch twin by tests that must catch it."""
    x32 = x_BTHE.float()
    rotated = torch.stack([-x32[..., 1::2], x32[..., ::2]], dim=-1).flatten(-2)
    return (x32 * cos_TE[:, None, :] + rotated * sin_TE[:, None, :]).to(x_BTHE.dtype)


def quick_first(values: list, n: int = 1, multi: bool = False) -> list:
    """Parametrize values of which the first `n` run in the quick tier (`pytest -m "not slow"`) and the rest are
    marked slow (the full suite runs them all). `multi`: each value is a tuple of several arguments."""
    return [v if i < n else pytest.param(*(v if multi else (v,)), marks=pytest.mark.slow) for i, v in enumerate(values)]
