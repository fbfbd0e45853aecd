"""The JAX twin's side of the training loop (shared_config/loop.py drives it): the model, its train state and its
steps, `jax.jit` over a donated state. Mirrors torch_model/trainer.py.

    trainer = Trainer(spec, cfg, train_state)            # canonical {"step", "weights", "m", "v"} in
    metrics = trainer.step(tokens_BN)                    # device scalars; trainer.fetch(metrics) waits for them
    trainer.train_state()                                # canonical out, for a checkpoint either twin resumes

Notation: B batch, N = T + 1 tokens per batch row.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from shared_config import ModelSpec, TrainConfig, check_train_state
from shared_config.tokens import host_rows

from . import distributed, train
from .checkpoint import from_weights
from .gla import set_kernel
from .precision import exact_float32


class Trainer:
    """The JAX twin: `jax.jit` train and eval steps over a donated train state."""

    name = "jax"

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, train_state: dict, compile: bool = True,
                 parallel: str | None = None):
        """`parallel`: a device mesh such as "data=2,fsdp=4" (parameters and moments over fsdp, batch rows over all);
        None: one device. compile=False: eager, for debugging. CheckpointError for a `train_state` that is not
        {"step", "weights", "m", "v"} of `spec`'s layout (check_train_state)."""
        exact_float32()  # float32 matmuls as torch computes them (no TF32)
        check_train_state(train_state, spec)  # a CheckpointError naming what is missing or wrong
        self.model = from_weights(train_state["weights"], spec)
        if spec.mixer == "gla":
            set_kernel(self.model, cfg.gla_kernel)  # a HardwareError for a kernel this machine does not have
        self.state = train.set_train_state(self.model, train.init_train_state(self.model, cfg), train_state)
        self.train_step = train.make_train_step(self.model, cfg, compile=compile)
        if parallel is not None:  # the same step over a device mesh
            mesh = distributed.make_mesh(parallel)
            self.state = jax.device_put(self.state, distributed.state_shardings(self.model, cfg, mesh))
            self.train_step = distributed.make_train_step(self.model, cfg, mesh)
        # on a mesh, each device evaluates its rows of the batch (torch: distributed.make_eval_step): make_train_step
        # put the model on the mesh first, whose hidden states then stay split by rows (layers.split_rows)
        self.eval_step = train.make_eval_step(self.model, compile=compile)

    def step(self, tokens_BN: np.ndarray) -> dict:
        """One update on the batch [B, N]; its metrics as device scalars (no host sync)."""
        self.state, metrics = self.train_step(self.state, tokens_BN)
        return metrics

    def eval_loss(self, tokens_BN: np.ndarray) -> dict:
        """The loss on the batch [B, N] as device scalars: loss (causal), and loss_topk for a routed spec."""
        return self.eval_step(self.state, tokens_BN)

    def scalars(self) -> dict:
        """alpha, shift and embed_scale by canonical name, device scalars."""
        return train.scalar_params(self.model, self.state)

    def fetch(self, tree):
        """Device values -> numpy (waits for them)."""
        return jax.device_get(tree)

    def train_state(self) -> dict:
        """The canonical train state {"step", "weights", "m", "v"}, gathered whole (a collective when sharded)."""
        return train.get_train_state(self.model, self.state)

    def set_train_state(self, canonical: dict) -> None:
        """Replace the train state with a canonical one; CheckpointError for one that is not (check_train_state, in
        set_train_state)."""
        self.state = train.set_train_state(self.model, self.state, canonical)

    def inspect(self, tokens_BN: np.ndarray) -> tuple[dict, dict, float, dict]:
        """The weights, the forward's taps, the loss and its gradients on the batch [B, N], as numpy: what the
        non-finite diagnosis reads; the batch as `step` takes it (a list of rows too). TokenError for a bad batch, as
        `step`'s."""
        nnx.update(self.model, self.state.params)
        # the loss first: it checks the batch (check_batch), before the taps' forward casts it (JAX made a float64
        # batch float32 and named that dtype, torch float64)
        loss, grads = train.loss_and_grads(self.model, tokens_BN)
        taps = train.forward_taps(self.model, host_rows(tokens_BN)[:, :-1])
        return self.train_state()["weights"], taps, loss, grads
