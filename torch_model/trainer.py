"""The PyTorch twin's side of the training loop (shared_config/loop.py drives it): the model, its train state and its
steps, eager or `torch.compile`d, updating the model and AdamW in place. Mirrors jax_model/trainer.py.

    trainer = Trainer(spec, cfg, train_state)            # canonical {"step", "weights", "m", "v"} in
    metrics = trainer.step(tokens_BN)                    # device scalars; trainer.fetch(metrics) waits for them
    trainer.train_state()                                # canonical out, for a checkpoint either twin resumes

Notation: B batch, N = T + 1 tokens per batch row.
"""

from __future__ import annotations

import numpy as np
import torch

from shared_config import ModelSpec, TrainConfig, check_train_state
from shared_config.tokens import host_rows

from . import distributed, train
from .checkpoint import from_weights
from .gla import set_kernel
from .precision import exact_float32
from .weights import whole


class Trainer:
    """The torch twin: eager (or `torch.compile`d) steps updating the model and AdamW in place."""

    name = "torch"

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, train_state: dict, compile: bool = False,
                 parallel: str | None = None):
        """`parallel`: "ddp" or "fsdp2" over torchrun's ranks (the weights are loaded whole first, FSDP2 then shards
        them); None: one device. compile=True: `torch.compile` the steps. CheckpointError for a `train_state` that is
        not {"step", "weights", "m", "v"} of `spec`'s layout (check_train_state)."""
        exact_float32()  # float32 matmuls as JAX computes them (no TF32)
        device = distributed.init_distributed()  # this rank's device under torchrun; else cuda if present, or cpu
        check_train_state(train_state, spec)  # a CheckpointError naming what is missing or wrong
        self.model = from_weights(train_state["weights"], spec, device=device)
        if spec.mixer == "gla":
            set_kernel(self.model, cfg.gla_kernel)  # a HardwareError for a kernel this machine does not have
        self.states = train if parallel is None else distributed  # get/set_train_state: whole tensors under FSDP2
        if parallel is None:
            self.state = train.set_train_state(self.model, train.init_train_state(self.model, cfg), train_state)
            self.train_step = train.make_train_step(self.model, cfg, compile=compile)
            self.eval_step = train.make_eval_step(self.model, compile=compile)
        else:  # the same steps over torchrun's ranks, each on its rows of the batch
            self.state, self.train_step = distributed.parallelize(self.model, cfg, parallel, compile=compile)
            self.state = distributed.set_train_state(self.model, self.state, train_state)
            self.eval_step = distributed.make_eval_step(self.model, compile=compile)

    def step(self, tokens_BN: np.ndarray) -> dict:
        """One update on the batch [B, N]; its metrics as device scalars (no host sync)."""
        return self.train_step(self.state, tokens_BN)[1]

    def eval_loss(self, tokens_BN: np.ndarray) -> dict:
        """The loss on the batch [B, N] as device scalars: loss (causal), and loss_topk for a routed spec."""
        return self.eval_step(self.state, tokens_BN)

    def scalars(self) -> dict:
        """alpha, shift and embed_scale by canonical name, device scalars."""
        return train.scalar_params(self.model, self.state)

    def fetch(self, tree):
        """Device values -> numpy (waits for them)."""
        return torch.utils._pytree.tree_map(lambda x: whole(x).detach().float().cpu().numpy(), tree)

    def train_state(self) -> dict:
        """The canonical train state {"step", "weights", "m", "v"}, gathered whole (a collective when sharded)."""
        return self.states.get_train_state(self.model, self.state)

    def set_train_state(self, canonical: dict) -> None:
        """Replace the train state with a canonical one; CheckpointError for one that is not (check_train_state, in
        set_train_state)."""
        self.state = self.states.set_train_state(self.model, self.state, canonical)

    def inspect(self, tokens_BN: np.ndarray) -> tuple[dict, dict, float, dict]:
        """The weights, the forward's taps, the loss and its gradients on the batch [B, N], as numpy: what the
        non-finite diagnosis reads; the batch as `step` takes it (a list of rows too). TokenError for a bad batch, as
        `step`'s."""
        # the loss first: it checks the batch (check_batch), before the taps' forward casts it (JAX made a float64
        # batch float32 and named that dtype, torch float64)
        loss, grads = train.loss_and_grads(self.model, tokens_BN)
        taps = train.forward_taps(self.model, host_rows(tokens_BN)[:, :-1])
        return self.train_state()["weights"], taps, loss, grads
