"""One benchmark setup per backend: build the model and a step to time, on the best device present.

Every backend gets the same spec, the same tokens and the same dtype policy; each `setup_*`
returns a `Bench` whose `step()` launches one step without reading anything back to the host,
and whose `sync(out)` blocks until that step's whole output exists.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shared_config import ModelSpec

from bench.devices import compile_mode, torch_device, torch_sync_and_peak


@dataclass
class Bench:
    """One backend's prepared job (train step, forward or decode) for bench/timing.py to time: what to call, how
    to wait for it and how to read its peak memory, so that every backend is timed by the same loop."""

    step: Callable[[], Any]  # one step; returns what `sync` waits on
    sync: Callable[[Any], None]
    attention: str  # the attention kernel that runs
    peak_mem: Callable[[], int | None]  # peak memory of a step in bytes (None where not measured: CPU decode)
    info: dict = field(default_factory=dict)  # compile mode, optimizer flavour, ...
    start: Callable[[], Any] | None = None  # decode mode: prefill a fresh cache before a round of steps
    hlo: Callable[[], str] | None = None  # JAX: the step's optimized HLO text (bench/profile_step.py reads it)


class DecodeLoop:
    """Decode mode's state: `start()` prefills the prompt into a fresh cache, each `step()` feeds one token."""

    def __init__(self, init_cache, prefill, decode_step, next_tokens):
        self.init_cache, self.prefill, self.decode_step, self.next_tokens = (init_cache, prefill, decode_step,
                                                                             next_tokens)
        self.cache = None

    def start(self):
        self.cache = None  # the old cache's buffers go before the new ones are allocated
        logits, self.cache = self.prefill(self.init_cache())
        return logits

    def step(self):
        logits, self.cache = self.decode_step(self.next_tokens, self.cache)
        return logits


# --- JAX ------------------------------------------------------------------------------------------


def setup_jax(spec: ModelSpec, tokens: np.ndarray, mode: str, attention: str, train_config, compile: bool,
              new_tokens: int = 0, mesh=None, gla_kernel: str = "auto") -> Bench:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_model

    model = jax_model.Transformer(spec, rngs=nnx.Rngs(0), attention=attention)
    if spec.mixer == "gla":
        from jax_model.gla import set_kernel

        set_kernel(model, gla_kernel)
    kernel = stack_kernel(spec, model.model.layers)
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32))
    start = None
    if mode == "forward":
        graphdef, params = nnx.split(model)
        forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
        step = lambda: forward(params, batch)  # noqa: E731
    elif mode == "decode":
        from jax_model.generate import Decoder

        decoder, (B, P) = Decoder(model), tokens.shape
        loop = DecodeLoop(lambda: decoder.init_cache(B, P + new_tokens), lambda cache: decoder.prefill(tokens, cache),
                          decoder.decode_step, np.ones(B, np.int32))
        step, start = loop.step, loop.start
    else:
        from jax_model import distributed, train

        if mesh is None:
            state, train_step = train.init_train_state(model, train_config), train.make_train_step(model, train_config)
        else:  # the same step jitted over the mesh: parameters, optimizer state and batch rows sharded
            state, train_step = distributed.parallelize(model, train_config, mesh)
            batch = distributed.shard_batch(batch, mesh)
        holder = {"state": state}

        def step():
            holder["state"], metrics = train_step(holder["state"], batch)
            return holder["state"], metrics

    @functools.cache  # peak_mem and hlo read the same executable: compile it once
    def compiled():
        jitted, args = (forward, (params, batch)) if mode == "forward" else (train_step, (holder["state"], batch))
        if mesh is not None and mode == "train":  # distributed's step places the batch, then calls the jitted function
            jitted, args = train_step.jitted, (holder["state"], batch, None)
        return jitted.lower(*args).compile()

    def peak_mem():
        """The step's device memory as XLA planned it (arguments + outputs − donated + temporaries): unlike the
        process-wide peak counter, it counts this job only."""
        if mode == "decode":
            return None
        m = compiled().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    info = {"compile": "jax.jit", **({"mesh": dict(mesh.shape)} if mesh is not None else {})}
    hlo = None if mode == "decode" else (lambda: compiled().as_text())
    return Bench(step, jax.block_until_ready, kernel, peak_mem, info, start, hlo)


# --- PyTorch --------------------------------------------------------------------------------------


# Lines torch's profiler (Kineto, in C++) prints on stderr at every start and stop, whatever its log level.
PROFILER_CHATTER = (b"USDT:", b"STAGE:")


@contextlib.contextmanager
def fd_to(fd: int, sink):
    """File descriptor `fd` (1: stdout, 2: stderr; what C and C++ code write to) into the open file `sink` while the
    block runs."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    os.dup2(sink.fileno(), fd)
    try:
        yield
    finally:
        (sys.stdout if fd == 1 else sys.stderr).flush()
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def without_profiler_chatter():
    """Stderr (the file descriptor, which C++ writes to) through a temporary file while the block runs; then
    every line but Kineto's chatter passes on."""
    with tempfile.TemporaryFile() as captured, warnings.catch_warnings():
        # torch 2.11 warns that its profiler "clears events at the end of each cycle" at the first cycle already
        # (torch 2.13 from the second on): each profile here is one cycle, and every bench log had the line
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        try:
            with fd_to(2, captured):
                yield
        finally:
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not line.startswith(PROFILER_CHATTER)]
            os.write(2, b"".join(kept))


def cpu_step_peak(step: Callable[[], Any], resident: list) -> int:
    """A torch step's peak CPU memory: the bytes of the tensors it keeps (`resident`: parameters, optimizer state,
    batch) plus the peak of what it allocates on top, read off the torch profiler's allocator events (CPU has no
    max_memory_allocated); the same count as XLA's memory analysis of the JAX step (arguments + temporaries)."""
    import json
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as directory:  # the allocator's running total is in the trace's events only
        prof.export_chrome_trace(f"{directory}/trace.json")
        events = json.loads(Path(f"{directory}/trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"]
              for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in resident if isinstance(t, torch.Tensor)}
    return sum(kept.values()) + max([0, *totals])


def torch_resident(model, optimizer, batch, working=()) -> list:
    """What a torch train step keeps between steps: parameters, AdamW's state, the working weights (train.TrainState),
    the batch; FSDP2's shards (DTensors, parameters and moments alike) as this rank's local tensors."""
    state = [x for s in optimizer.state.values() for x in s.values()]
    return [x.to_local() if hasattr(x, "to_local") else x for x in [*model.parameters(), *state, *working, batch]]


def setup_torch(spec: ModelSpec, tokens: np.ndarray, mode: str, attention: str, train_config, compile: bool,
                new_tokens: int = 0, parallel: str | None = None, gla_kernel: str = "auto") -> Bench:
    import torch

    import torch_model
    from torch_model.model import compile_isolated

    device = torch_device()
    sync, peak_mem = torch_sync_and_peak(device)
    with device:
        model = torch_model.Transformer(spec, generator=None, attention=attention)
    if spec.mixer == "gla":
        from torch_model.gla import set_kernel

        set_kernel(model, gla_kernel)
    kernel = stack_kernel(spec, model.model.layers)
    batch = torch.as_tensor(tokens, device=device)
    start = None
    if mode == "forward":
        forward = compile_isolated(model) if compile else model

        def step():
            with torch.no_grad():
                return forward(batch)
    elif mode == "decode":
        from torch_model.generate import Decoder

        decoder, (B, P) = Decoder(model, compile="inductor" if compile else None), tokens.shape
        loop = DecodeLoop(lambda: decoder.init_cache(B, P + new_tokens), lambda cache: decoder.prefill(tokens, cache),
                          decoder.decode_step, np.ones(B, np.int64))
        step, start = loop.step, loop.start
    else:
        from torch_model import distributed, train

        if parallel is None:  # torch's fused AdamW has no XLA kernel: foreach on a TPU
            state = train.init_train_state(model, train_config, fused=device.type != "xla")
            train_step = train.make_train_step(model, train_config, compile=compile)
        else:  # under torchrun: every rank steps on the global batch, reading its own rows of it
            state, train_step = distributed.parallelize(model, train_config, parallel, compile=compile)
        step = lambda: train_step(state, batch)  # noqa: E731
        if device.type == "cpu":
            peak_mem = lambda: cpu_step_peak(step, torch_resident(model, state.optimizer, batch,  # noqa: E731
                                                                  state.working.values()))
    return Bench(step, sync, kernel, peak_mem, {"compile": compile_mode(compile, device)}, start)


# --- Hugging Face transformers (LlamaForCausalLM): the peer users would otherwise pick -------------


def setup_hf(spec: ModelSpec, tokens: np.ndarray, mode: str, attention: str, train_config, compile: bool,
             new_tokens: int = 0) -> Bench:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from shared_config.formats.hf import config_from_spec
    from torch_model.model import compile_isolated  # the peer's compiled forward gets its own budget too

    device = torch_device()
    sync, peak_mem = torch_sync_and_peak(device)
    config = config_from_spec(spec, "--backend hf")  # Llama (Qwen3 with qk_norm); refuses what HF cannot compute
    config = AutoConfig.for_model(**{**config, "dtype": spec.param_dtype})  # the twins' weights' dtype
    dtype = torch.bfloat16 if spec.compute_dtype == "bfloat16" else torch.float32
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    batch = torch.as_tensor(tokens, dtype=torch.int64, device=device)  # what HF's embedding and loss take
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    start = None
    if mode == "decode":  # transformers' own cache (DynamicCache), eager: its generate() loop without sampling
        next_B1 = torch.ones(batch.shape[0], 1, dtype=torch.int64, device=device)

        @torch.no_grad()
        def prefill(cache):
            with autocast:
                out = model(batch, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        @torch.no_grad()
        def decode_step(next_B1, cache):
            with autocast:
                out = model(next_B1, past_key_values=cache, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        loop = DecodeLoop(lambda: None, prefill, decode_step, next_B1)
        step, start, compile = loop.step, loop.start, False
    elif mode == "forward":
        forward = compile_isolated(model) if compile else model

        def step():
            with torch.no_grad(), autocast:
                return forward(batch).logits
    else:
        from torch_model.train import clip_by_global_norm, make_optimizer

        # HF Llama's parameter names are the canonical ones with q/k/v apart: the unfused spec describes them,
        # so the twins' optimizer (parameter groups, weight decay rule, fused AdamW, schedule) applies as is.
        model.spec = spec.replace(fused_qkv=False)
        optimizer, scheduler = make_optimizer(model, train_config, fused=device.type != "xla")
        forward = compile_isolated(model) if compile else model

        def step():
            with autocast:
                logits = forward(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            grad_norm = clip_by_global_norm([p.grad for p in model.parameters()], train_config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return loss, grad_norm
    info = {"compile": compile_mode(compile, device), "model": type(model).__name__, "autocast": str(dtype)}
    return Bench(step, sync, "sdpa", peak_mem, info, start)


def stack_kernel(spec, layers) -> str:
    """What the blocks' token mixers run: `mixer_kernel` of the first layer of each mixer, joined by "+" (a hybrid
    stack's GLA and attention layers: `gla-chunk64+blocked`)."""
    first = {}
    for i, layer in enumerate(layers):
        first.setdefault(spec.mixer_of(i), layer.self_attn)
    return "+".join(mixer_kernel(spec, mixer, kind) for kind, mixer in first.items())


def mixer_kernel(spec, mixer, kind: str | None = None) -> str:
    """What a block's token mixer runs, by its mixer `kind` (default `spec.mixer`): the attention kernel, GLA's kernel
    (the pure form: its chunk size), or the name of a mixer with no kernel to choose (any other read GLA's attributes
    off it and failed)."""
    kind = spec.mixer if kind is None else kind
    if kind == "attention":
        return mixer.attention
    if kind == "gla":
        return f"gla-chunk{mixer.chunk}" if mixer.kernel == "pure" else f"gla-{mixer.kernel}"
    return kind
