"""What a spec costs before anything is built: tensor counts and bytes computed arithmetically, the memory
a command will need, the memory this machine grants, and which library errors mean "out of memory".

A spec claiming a billion layers or a trillion-token vocabulary is refused here in microseconds, where
`layout(spec)` or an allocation would take minutes and the machine's memory first.
"""

from __future__ import annotations

import math
import os
import resource
from decimal import Decimal
from pathlib import Path

from .layout import GLA_CHUNK, GLA_SUB, layout, state_arrays, state_layout
from .config_file import SpecError
from .spec import ModelSpec

GB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class ResourceError(RuntimeError):
    """The machine cannot do what was asked (memory, disk, a lock held by another process): exit code 3."""


def layout_size(spec: ModelSpec) -> tuple[int, int, int]:
    """(tensors, parameters, largest tensor's parameters) of `layout(spec)`, computed without building the
    per-layer table of a deep spec, so that a spec claiming 10^7 layers is sized in microseconds.

    Blocks may differ by index, but only as block 0 (HybridNorm*'s pre-norm block) and by parity after it
    (routing's every other block): a table of 4 or 5 layers (keeping the parity of `n_layers`, which some
    rules read) holds one block of each kind, and the rest repeat them. A hybrid stack's differ by mixer alone:
    a table of one GLA and one attention block. `test_claimed_sizes.py` checks this against the full table for
    every placement, mixer and routing choice.
    """
    L = spec.L
    if L <= 8:
        return _table_size(layout(spec))
    # a hybrid stack's blocks differ by mixer alone (GLA takes no routing and no HybridNorm*): a GLA block 0, an
    # attention block 1, as many of each as the stack has
    hybrid, n_attention = spec.gla_attention_every > 0, spec.layer_mixers.get("attention", 0)
    try:
        table = layout(spec.replace(n_layers=2, gla_attention_every=2) if hybrid
                       else spec.replace(n_layers=4 if L % 2 == 0 else 5))
    except SpecError:  # a rule that needs the real depth: the full table (a valid spec's is small enough)
        return _table_size(layout(spec))
    kinds = {i: [math.prod(t.shape) for t in table if t.name.startswith(f"model.layers.{i}.")] for i in range(3)}
    rest = [math.prod(t.shape) for t in table if not t.name.startswith("model.layers.")]
    # block 0, odd blocks, even blocks after 0; a hybrid's GLA and attention blocks
    counts = {0: L - n_attention, 1: n_attention, 2: 0} if hybrid else {0: 1, 1: L // 2, 2: (L - 1) // 2}
    tensors = len(rest) + sum(counts[i] * len(kinds[i]) for i in kinds)
    params = sum(rest) + sum(counts[i] * sum(kinds[i]) for i in kinds)
    return tensors, params, max(rest + kinds[0] + kinds[1] + kinds[2])


def _table_size(table) -> tuple[int, int, int]:
    sizes = [math.prod(t.shape) for t in table]
    return len(sizes), sum(sizes), max(sizes)


def weights_bytes(spec: ModelSpec) -> int:
    """Bytes of the canonical weights in the spec's param dtype."""
    return layout_size(spec)[1] * DTYPE_BYTES[spec.param_dtype]


def model_bytes(spec: ModelSpec) -> int:
    """Bytes of building a twin's model: its parameters in the param dtype and the float32 arrays they are set from
    (the native draws, or the float32 copy `from_weights` loads)."""
    return layout_size(spec)[1] * (DTYPE_BYTES[spec.param_dtype] + 4)


def check_model_memory(spec: ModelSpec) -> None:
    """Refuse (ResourceError) to build a model that cannot fit in memory, before any allocation: a spec of d_model 10^6
    failed in the allocator (or, tensor by tensor, took the machine's memory first)."""
    check_memory(model_bytes(spec), f"a model of {spec.L:,} layers, d_model {spec.D:,} and vocab {spec.V:,} "
                 f"({layout_size(spec)[1]:,} parameters)", "use a smaller spec")


def init_bytes(spec: ModelSpec) -> int:
    """Peak bytes of drawing and saving a checkpoint: the weights, a float64 draw of the largest tensor and its
    float32 copy, and the serialised copy the safetensors writer builds."""
    _, _, largest = layout_size(spec)
    return 2 * weights_bytes(spec) + 12 * largest


def train_bytes(spec: ModelSpec, batch: int, seq: int, grad_accum_steps: int = 1, remat: str = "none",
                loss_chunk: int = 0) -> int:
    """A lower bound on the host bytes of one training job: weights, gradients and AdamW's two moments in float32
    in the framework plus the numpy copies of weights and moments (8 copies), and, on a machine without an
    accelerator, the activations kept for the backward pass of one micro-batch (batch / grad_accum_steps rows), 4 bytes
    per float32 value: each layer's values by its token mixer (`layer_values`, the layers counted per mixer by
    `spec.layer_mixers`, never walked); remat "block" keeps each layer's matmul outputs, "full" its input, both plus the
    last layer recomputed in full (the first one the backward recomputes, while every other layer's kept values are
    held); then the logits, 3 V per token of one loss chunk (loss_chunk; 0 or past the tokens: all of them at once).
    On an accelerator they live in its memory, which the frameworks report themselves when it runs out
    (`is_out_of_memory`). The memory options are the train config's (docs/training.md, "Training bigger models")."""
    _, params, _ = layout_size(spec)
    rows = max(1, batch // max(1, grad_accum_steps))
    tokens = rows * seq
    kept = {m: layer_values(spec, m, rows, seq, remat) for m in spec.layer_mixers}
    last = spec.mixer_of(spec.L - 1)
    layers = sum(n * kept[m] for m, n in spec.layer_mixers.items())
    if remat != "none":  # the last layer's kept values are part of its recomputed ones
        layers += layer_values(spec, last, rows, seq, "none") - kept[last]
    logits = 3 * min(loss_chunk or tokens, tokens) * spec.V
    activations = 0 if accelerator_present() else layers + logits
    return 4 * (8 * params + activations)


def layer_values(spec: ModelSpec, mixer: str, rows: int, seq: int, remat: str = "none") -> int:
    """Float32 values one layer of token mixer `mixer` keeps for the backward on `rows` rows of `seq` tokens (T). Around
    either mixer, 8 D + 3 F per token (norms, residual, MLP). Softmax attention: its q, k, v and output, (2 H + 2 K) E
    per token (K key/value heads of E); not its [H, T, T] weights, which the torch twin's SDPA and JAX's blocked kernel
    never keep (XLA's default kernel does: a job that then runs out is reported by `is_out_of_memory`), so that the
    bound holds for every kernel (measured at D 256, 2 layers, 2 x 2048 tokens: torch 195 MiB in all, the [H, T, T]
    weights alone 268). GLA (`chunked_gla`, chunks of C = min(64, T) tokens in sub-chunks of c = 16): per token q, k and
    the log-gates (3 d_k), the gate's rank-R projection (R), v, the output gate and the heads' output (3 d_v), the pairs
    within a sub-chunk (q, k and their decays: 3 (c + 1) / 2 d_k), the keys decayed to the later sub-chunks ((C / c - 1)
    d_k) and the intra-chunk scores (H C); per row the state at each chunk's start ([H, K', V'] per chunk). ValueError
    for another mixer. remat "block": the matmul outputs (attention (H + 2 K) E + D + 2 F; GLA q, k, v, output gate,
    o_proj 2 d_k + 2 d_v + D, and 2 F), "full": the layer's input, D."""
    if mixer not in ("attention", "gla"):  # it would be counted as GLA's values
        raise ValueError(f"layer_values: no count for mixer={mixer!r} (docs/extending.md)")
    tokens, D, F = rows * seq, spec.D, spec.F
    if remat != "none":
        qkv = (spec.H + 2 * spec.K) * spec.E if mixer == "attention" else 2 * spec.d_k + 2 * spec.d_v
        return tokens * {"block": 2 * F + qkv + D, "full": D}[remat]
    if mixer == "attention":
        return tokens * (8 * D + 3 * F + 2 * (spec.H + spec.K) * spec.E)
    # CPU, D 256, H 4, F 512, 2 GLA layers, 1 x 8192 tokens: 573 MiB counted (2,360 with [H, T, T]), torch 863, XLA 924
    C = min(GLA_CHUNK, GLA_SUB * -(-seq // GLA_SUB))
    dk, dv = spec.d_k, spec.d_v
    per_token = (8 * D + 3 * F + 3 * dk + spec.gla_gate_rank + 3 * dv + 3 * (GLA_SUB + 1) * dk // 2
                 + max(C // GLA_SUB - 1, 0) * dk + spec.H * C)
    return tokens * per_token + rows * -(-seq // GLA_CHUNK) * spec.H * spec.Kh * spec.Vh


def accelerator_present() -> bool:
    """Whether this machine has a GPU or TPU device node, found without importing a framework."""
    return any(next(Path("/dev").glob(pattern), None) for pattern in ("nvidia[0-9]*", "accel[0-9]*", "kfd"))


def forward_bytes(spec: ModelSpec, batch: int, seq: int) -> int:
    """A lower bound on the host bytes of a forward or decode job: the weights twice (numpy and the framework's
    copy) and, without an accelerator, the float32 logits with their softmax."""
    return 2 * weights_bytes(spec) + (0 if accelerator_present() else 4 * 2 * batch * seq * spec.V)


def cache_bytes(spec: ModelSpec, batch: int, size: int) -> int:
    """The host bytes of a decoding cache of `batch` rows and `size` slots (the twins' `generate`: the longest prompt
    plus max_new_tokens - 1), 0 on a machine with an accelerator (it lives there): every layer's state as
    `layout.state_layout` and `layout.state_arrays` give it (attention's keys and values [B, S, K, E] in the compute
    dtype, GLA's state [B, H, K', V'] float32, whatever the slots), counted per mixer (`spec.layer_mixers`, never
    walked). In Python ints: numpy counts (init_cache(np.int8(100), np.int8(16))) wrapped the product, an estimate
    that could pass a cache past this machine's memory."""
    state, batch, size = 0, int(batch), int(size)
    for mixer, n in spec.layer_mixers.items():
        shape, dtype = state_layout(spec, mixer, batch, size)
        state += n * state_arrays(mixer) * math.prod(shape) * DTYPE_BYTES[dtype]
    return 0 if accelerator_present() else state


def report_bytes(spec: ModelSpec, batch: int, seq: int) -> int:
    """A lower bound on the host bytes of scripts/parity_report.py's forward and gradient stages on `batch` rows of
    `seq` tokens: the weights twice (numpy and a twin's copy), and each twin's taps as float64 numpy arrays (3 L + 2
    stages of [B, T, D]: the embeddings, every block's attention output, MLP output and residual stream, the final
    norm) with its float32 logits [B, T, V], all kept to the end; then the larger of two moments: the torch twin's
    backward pass (the activations `train_bytes` counts for the same batch, none on an accelerator) or the logits'
    comparison in float64 (both twins' logits converted and their difference: 24 bytes per logit)."""
    tokens = batch * seq
    kept = 2 * 8 * (3 * spec.L + 2) * tokens * spec.D + 2 * 4 * tokens * spec.V
    backward = train_bytes(spec, batch, seq) - train_bytes(spec, batch, 0)  # the activations: no tokens, none
    return 2 * weights_bytes(spec) + kept + max(backward, 24 * tokens * spec.V)


def machine_memory() -> tuple[int, str]:
    """(bytes this process may use, where that figure comes from): the least of the physical memory, the cgroup's
    limit and the process's RLIMIT_AS / RLIMIT_DATA."""
    found = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of memory on this machine")]
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            found.append((int(Path(cgroup).read_text()), "of memory in this container (cgroup limit)"))
        except (OSError, ValueError):  # absent, or "max"
            pass
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY:
            found.append((soft, f"allowed to this process ({name})"))
    return min(found)


def gib(n: int) -> str:
    """`n` bytes in GiB, one decimal: `--set n_layers=` 400 nines made an int past float's range, whose `n / GB` was
    an OverflowError's traceback in place of the memory check's error line."""
    return f"{n / GB:,.1f}" if n < 2**1000 else f"{Decimal(n) / GB:.3e}"  # Decimal: any size


def check_memory(need: int, job: str, hint: str) -> None:
    """Refuse (ResourceError) a job whose estimated `need` in bytes is above the memory this process may use."""
    have, where = machine_memory()
    if need > have:
        raise ResourceError(f"{job} needs about {gib(need)} GiB of memory, {gib(have)} GiB {where}; {hint}")


def is_out_of_memory(e: BaseException) -> bool:
    """True for the ways numpy, torch (CPU and CUDA) and XLA report an allocation that failed."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, (RuntimeError, ValueError)) and any(
        s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "can't allocate memory")
    )
