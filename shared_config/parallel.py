"""Data-parallel and fully-sharded training, framework-neutral: which dimension of each canonical tensor
is sharded, and how a global batch is split (no numpy, no framework).

Both twins read these rules, written once against the layout table: jax_model/distributed.py turns
them into `PartitionSpec`s over the `fsdp` axis of a device mesh, torch_model/distributed.py into
FSDP2 `Shard` placements and each rank's rows.
"""

from __future__ import annotations

from .layout import Tensor
from .config_file import SpecError, did_you_mean

AXES = ("data", "fsdp")


def fsdp_dim(t: Tensor, n: int) -> int | None:
    """The dim of canonical tensor `t` (torch orientation) split n ways over fsdp; None: replicated.

    Linear weights and embeddings: the larger dim (dim 0 on a tie) when n divides it, else the other
    when n divides that. Norm weights, biases and scalars are small and stay whole everywhere.
    """
    if n == 1 or t.kind == "param":
        return None
    by_size = sorted(range(len(t.shape)), key=lambda d: -t.shape[d])  # stable: dim 0 first on a tie
    return next((d for d in by_size if t.shape[d] % n == 0), None)


def rows_per_shard(batch_size: int, shards: int) -> int:
    """Rows each of `shards` devices or ranks reads from a global batch: the global batch is fixed, split evenly."""
    if batch_size % shards:
        raise SpecError(f"batch_size={batch_size} must be divisible by the {shards} data-parallel shards "
                        f"(data × fsdp devices, or torch ranks): the global batch is split evenly across them")
    return batch_size // shards


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; an axis left out has size 1."""
    sizes, given = dict.fromkeys(AXES, 1), set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if name not in AXES:
            raise SpecError(f"mesh {text!r}: unknown axis {name!r}{did_you_mean(name, AXES)} (axes: {', '.join(AXES)})")
        # ASCII digits only: str.isdigit also takes '²', which int() then refused in a traceback
        if not sep or not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise SpecError(f"mesh {text!r}: {item!r} must be axis=N with N >= 1")
        if name in given:  # data=2,data=4 kept the last silently
            raise SpecError(f"mesh {text!r}: axis {name!r} given twice")
        sizes[name] = int(value)
        given.add(name)
    return sizes
