"""The training config: one flat, frozen dataclass whose fields are exactly the YAML keys.

Separate from the model spec (a spec says what the model computes; a train config says how a run
trains it). Validated like `ModelSpec`: unknown keys get the closest valid key suggested, every
error names the field, the value and the rule. The rules that both twins' optimizers share (which
tensors are weight-decayed, the learning-rate schedule) live here, once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .layout import Tensor
from .config_file import SpecError, check_float32, check_type, from_mapping, load_preset_or_file, yaml_names
from .hardware import GLA_KERNELS
from .spec import CHOICES, ModelSpec

TRAIN_DIR = Path(__file__).parent / "train"

TRAIN_CHOICES = {"schedule": ("constant", "cosine", "linear"), "compute_dtype": CHOICES["compute_dtype"],
                 "remat": ("none", "block", "full"), "gla_kernel": GLA_KERNELS}
# Options that change a step's memory, or the kernels it runs, not its math (docs/training.md): a resumed run may
# change them
MEMORY_OPTIONS = ("grad_accum_steps", "remat", "loss_chunk")
COMPUTE_OPTIONS = (*MEMORY_OPTIONS, "gla_kernel")
MAX_STEPS = 2**31 - 1  # the JAX twin counts steps in int32: a larger count was an OverflowError traceback


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains, as opposed to what it trains (ModelSpec): optimizer, schedule, batch, steps, precision
    and the compute options that change memory or speed but not the result (`COMPUTE_OPTIONS`). Field for field
    the keys of a train preset (shared_config/train/*.yaml; docs/training.md); checked on construction
    (SpecError). Both twins' trainers read the same config."""

    # AdamW (decoupled weight decay, Loshchilov & Hutter 2019)
    lr: float = 3e-4  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # added to sqrt(v̂), outside the square root
    weight_decay: float = 0.1  # multiplied by the scheduled lr, as in both torch and optax
    decay_embeddings: bool = False  # Linear weights are always decayed; norms, alpha, shift, embed_scale, biases never
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 turns clipping off
    # schedule: linear warmup to `lr`, then `schedule` down to `min_lr_ratio · lr` at `steps`
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    # run
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256  # tokens the model reads per row; a batch row holds seq_len + 1 tokens
    seed: int = 0
    compute_dtype: str | None = None  # None: the spec's compute_dtype; else overrides it for this run
    # memory (MEMORY_OPTIONS): the same update at float32's rounding, less memory
    grad_accum_steps: int = 1  # one update over batch_size rows, run as this many micro-batches of batch_size / it rows
    remat: str = "none"  # recompute in the backward, per block: "block" all but the matmuls' outputs, "full" everything
    loss_chunk: int = 0  # LM head + cross-entropy fused over chunks of this many tokens (0: all at once)
    # the GLA layers' kernel (mixer: gla): auto, pure, pallas (the JAX twin, GPU) or fla (the torch twin, GPU)
    gla_kernel: str = "auto"
    # --- conditional computation (routing.py): auxiliary loss weights, read by routed specs only ---
    router_predictor_loss_weight: float = 1.0  # × the routed blocks' mean BCE of the causal predictor vs top-k
    dtf_prior_loss_weight: float = 0.05  # × the dynamic blocks' mean MSE(H_prior, stopgrad(H_post))

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, check_type(f, getattr(self, f.name), TRAIN_CHOICES))
        _check_rules(self)

    def to_dict(self) -> dict[str, Any]:
        """The preset's keys and values (what run.json records)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        """The config with `changes`, checked again."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config of a mapping of preset keys; SpecError for an unknown key, a wrong type or a broken rule."""
        return from_mapping(cls, d, "train config")

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        """`spec` as this run trains it: `compute_dtype` overridden when set, `seq_len` checked against it (and
        against a routed spec's capacity: at least one token a sequence runs each routed block), and a `gla_kernel`
        other than auto refused (SpecError) where the spec has no GLA layer for it to run."""
        if self.seq_len > spec.max_seq_len:
            raise SpecError(f"seq_len={self.seq_len} must be <= the spec's max_seq_len={spec.max_seq_len}")
        if spec.routing != "none" and spec.routed_tokens(self.seq_len) == 0:  # the blocks never ran
            raise SpecError(f"routing_capacity={spec.routing_capacity} of seq_len={self.seq_len} routes "
                            f"floor({spec.routing_capacity} x {self.seq_len}) = 0 tokens a sequence: the routed blocks "
                            f"would never run or learn; raise seq_len or routing_capacity (to at least "
                            f"{1 / self.seq_len:.3g})")
        if self.gla_kernel != "auto" and spec.mixer != "gla":  # it would run, the choice ignored
            raise SpecError(f"gla_kernel={self.gla_kernel} picks the GLA layers' kernel; the spec's mixer is "
                            f"{spec.mixer} and has none (leave gla_kernel at auto)")
        return spec if self.compute_dtype is None else spec.replace(compute_dtype=self.compute_dtype)


def _check_rules(c: TrainConfig) -> None:
    for name in ("lr", "eps", "steps", "batch_size", "seq_len"):
        if getattr(c, name) <= 0:
            raise SpecError(f"{name}={getattr(c, name)} must be > 0")
    for name in ("weight_decay", "grad_clip", "warmup_steps", "seed", "loss_chunk", "router_predictor_loss_weight",
                 "dtf_prior_loss_weight"):
        if getattr(c, name) < 0:
            raise SpecError(f"{name}={getattr(c, name)} must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise SpecError(f"{name}={getattr(c, name)} must be in [0, 1)")
    if not 0 <= c.min_lr_ratio <= 1:
        raise SpecError(f"min_lr_ratio={c.min_lr_ratio} must be in [0, 1]")
    _check_float32(c)
    if c.grad_accum_steps < 1 or c.batch_size % c.grad_accum_steps:
        raise SpecError(f"grad_accum_steps={c.grad_accum_steps} must be >= 1 and divide batch_size={c.batch_size}")
    if c.steps > MAX_STEPS:
        raise SpecError(f"steps={c.steps} must be at most {MAX_STEPS:,} (the step counter is a 32-bit integer)")
    if c.warmup_steps > c.steps:
        raise SpecError(f"warmup_steps={c.warmup_steps} must be <= steps={c.steps}")


def _check_float32(c: TrainConfig) -> None:
    """The optimizer's and the losses' floats enter float32 arithmetic (the JAX twin schedules the lr in float32, both
    twins' AdamW update float32 moments): each must be a normal float32 number, or 0 where 0 means off. lr=1e-40 is
    subnormal, flushed to 0 by XLA and kept by torch; eps=1e-320 is 0, and optax's update of a parameter with no
    gradient 0/0, NaN; beta2=1 - 1e-10 is 1 in float32, where optax's bias correction 1 - beta2^t is 0 (no update at
    all) while torch's, in float64, is not (a full one)."""
    for name in ("lr", "eps"):
        check_float32(name, getattr(c, name), "the optimizer computes with it in float32")
    for name in ("beta1", "beta2", "weight_decay", "grad_clip", "min_lr_ratio", "router_predictor_loss_weight",
                 "dtf_prior_loss_weight"):
        check_float32(name, getattr(c, name), "the optimizer or the loss computes with it in float32", zero=True)
    for name in ("beta1", "beta2"):
        if np.float32(getattr(c, name)) == 1:  # the largest float32 below 1 is 1 - 2^-24
            raise SpecError(f"{name}={getattr(c, name)} is 1 in float32: it must be below 0.99999997 (1 - 2^-25); at 1 "
                            "Adam's bias correction 1 - beta^t is 0")


def train_preset_names() -> list[str]:
    """The names of the shipped train presets (shared_config/train/*.yaml), sorted."""
    return yaml_names(TRAIN_DIR)


def as_train_config(cfg) -> TrainConfig:
    """`cfg` as a TrainConfig: a config, or what `load_train_config` takes (a preset name, a YAML path, a dict), as
    `from_weights` takes a spec; None is a SpecError (the twins' train functions read its fields: a dict or None was
    an AttributeError, 'dict' object has no attribute 'decay_embeddings')."""
    if cfg is None:
        raise SpecError("cfg is None: give a TrainConfig, or a preset name, a YAML path or a dict of its keys "
                        "(shared_config.load_train_config)")
    return load_train_config(cfg)


def load_train_config(source: str | Path | Mapping[str, Any] | TrainConfig | None = None) -> TrainConfig:
    """A train config from a preset name (`cpu`), a YAML path, a dict, a config, or None (the defaults)."""
    if source is None:
        return TrainConfig()
    if isinstance(source, TrainConfig):
        return source
    if isinstance(source, Mapping):
        return TrainConfig.from_dict(source)
    return load_preset_or_file(source, TRAIN_DIR, "train config", TrainConfig.from_dict)


def decays(t: Tensor, cfg: TrainConfig) -> bool:
    """Whether AdamW decays tensor `t` (a row of `layout`/`model_layout`): read off its kind, never its name."""
    if t.kind == "embedding":
        return cfg.decay_embeddings
    return t.kind == "linear"  # "param": norm weights and biases, alpha, shift, embed_scale, qk-norm weights


def lr_factor(cfg: TrainConfig, step, xp=np):
    """The multiplier of `cfg.lr` for the update at `step` (0-based), with `xp` numpy or jax.numpy.

    Warmup: (step + 1) / (warmup_steps + 1), reaching 1 at step = warmup_steps (step 0 is not
    wasted on lr 0). Then `schedule` over the remaining steps, down to `min_lr_ratio` at `steps`
    and flat after.
    """
    W, floor = cfg.warmup_steps, cfg.min_lr_ratio
    warmup = (step + 1) / (W + 1)
    progress = xp.clip((step - W) / max(1, cfg.steps - W), 0.0, 1.0)
    if cfg.schedule == "cosine":
        decay = floor + (1 - floor) * 0.5 * (1 + xp.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        decay = floor + (1 - floor) * (1 - progress)
    else:
        decay = xp.ones_like(progress)
    return xp.where(step < W, warmup, decay)
