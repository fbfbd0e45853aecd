"""The training loop, framework-neutral: batches, metrics, evaluation, checkpoints and the non-finite stop, driving
one twin's trainer (jax_model/trainer.py, torch_model/trainer.py) through the small interface `Trainer` below.

    make_trainer = trainer_factory(Trainer, run)     # the twin's Trainer class, a Run (shared_config/run.py)
    summary = Loop(run, make_trainer)()               # train run.start() -> run.stop; the last step's summary

Metrics go to OUT/metrics.jsonl, checkpoints to OUT/step-NNNNNNNN/ (shared_config/run_dir.py); progress to stderr.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from tqdm import tqdm

from .data import TOKEN_DTYPES
from .layout import flat_taps, layout
from .metrics import append_metrics, truncate_metrics
from .progress import advance, progress, restart_clock, writing
from .run import Run, is_main_process
from .run_dir import (
    CADENCE_MIN, METRICS_FILE, MOMENTS, checkpoint_name, checkpoint_step, copy_tokenizer, latest_checkpoint,
    list_checkpoints, load_train_checkpoint, prune_checkpoints, record_invocation, save_train_checkpoint,
    write_run_info,
)


class Trainer(Protocol):
    """One twin's side of the loop: the model, its train state and its compiled steps (each twin's trainer.py)."""

    name: str

    def step(self, tokens_BN: np.ndarray) -> dict: ...  # one update; device-scalar metrics, no host sync
    def eval_loss(self, tokens_BN: np.ndarray): ...  # device scalars: loss (causal), routed specs also loss_topk
    def scalars(self) -> dict: ...  # alpha, shift, embed_scale by canonical name, device scalars
    def fetch(self, tree): ...  # device values -> numpy (waits for them)
    def train_state(self) -> dict: ...  # canonical {"step", "weights", "m", "v"}
    def inspect(self, tokens_BN: np.ndarray) -> tuple[dict, dict, float, dict]: ...  # weights, taps, loss, grads


def trainer_factory(trainer: Callable[..., Trainer], run: Run, compile: bool | None = None,
                    parallel: str | None = None) -> Callable[[dict], Trainer]:
    """`make_trainer(train_state)` for a twin's Trainer class; compile=None keeps the twin's default; `parallel` (a
    JAX mesh such as data=2,fsdp=4, or torch's ddp/fsdp2 under torchrun) scales the same step out."""
    options = {} if compile is None else {"compile": compile}
    options.update({"parallel": parallel} if parallel else {})
    return partial(trainer, run.spec, run.cfg, **options)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run; the message names the step and the first bad tensor."""


class Loop:
    """The trainer-neutral loop: batches, metrics, evaluation, checkpoints, the non-finite stop."""

    def __init__(self, run: Run, make_trainer: Callable[[dict], Trainer], progress: bool = True):
        self.main = is_main_process()  # scaled out, every process runs the loop; process 0 alone writes and reports
        self.run, self.make_trainer, self.progress = run, make_trainer, progress and self.main
        self.metrics_path = run.out / METRICS_FILE
        self.val_batches = run.data.val_batches(run.eval_batches, run.cfg.batch_size, run.cfg.seq_len)
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
        self.summary: dict = {}
        self.stepping = False  # the trainer is made and steps: an error from here on is the run's, not its set-up's

    def __call__(self) -> dict:
        """Train from `run.start()` to `run.stop`; the summary of the last step."""
        run = self.run
        state = run.start()
        self.prepare(state["step"])
        if state["step"] >= run.stop:
            self.bar_note(f"nothing to do: the run is at step {state['step']} and --stop-at/steps is {run.stop}")
            return {"step": state["step"], "checkpoint": str(latest_checkpoint(run.out))}
        trainer = self.make_trainer(state)
        if self.main and state["step"] and "invocations" in (run.info or {}):  # a resume's, once its checkpoint
            # loaded and its trainer made: one refused before (NaN weights: exit 2) leaves run.json as it was
            record_invocation(run.out, run.info, run.record)
        first, self.clock, self.stepping = state["step"] + 1, Clock(run.cfg.batch_size * run.cfg.seq_len), True
        with progress(total=run.stop, initial=state["step"], desc=trainer.name, quiet=not self.progress,
                      dynamic_ncols=True) as self.bar:
            for step in range(first, run.stop + 1):
                self.pending.append((step, trainer.step(run.batch(step))))
                last = step == run.stop
                evaluate, save = last or due(step, run.eval_every), last or due(step, run.save_every)
                if step == first or due(step, run.log_every) or evaluate or save:  # the first: compilation timed apart
                    self.flush(trainer, step, first=step == first)
                if evaluate:
                    self.evaluate(trainer, step)
                if save:
                    self.save(trainer, step)
        return self.summary

    def prepare(self, step: int) -> None:
        """The output directory: run.json and tokenizer.json on a fresh start; metrics cut back to `step`."""
        run = self.run
        if not self.main:
            return
        run.out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, step)
        if step == 0:
            write_run_info(run.out, run.record())
        if run.data.tokenizer is not None:
            copy_tokenizer(run.out, run.data.tokenizer)
        self.bar_note(describe(run, step))

    def flush(self, trainer: Trainer, step: int, first: bool = False) -> None:
        """Fetch the pending metrics, stop on a non-finite one, log them (with the scalars at `step`); after the
        `first` step (compilation) the bar's clock restarts, so that its ETA counts the steps after."""
        fetched = trainer.fetch([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        records = [{"kind": "train", "step": s, **{k: float(m[k]) for k in metric_order(m)}}
                   for s, m in zip(steps, fetched)]
        # any NaN/Inf gradient makes the norm non-finite: the fraction is 0 exactly while it is finite
        for r in records:
            r["nonfinite"] = 0.0 if math.isfinite(r["grad_norm"]) else None  # else counted by the replay below
        self.pending = []
        if bad := next((r for r in records if not finite_step(r)), None):
            message = self.nonfinite_message(bad)
            self.append([r for r in records if r["step"] <= bad["step"]])
            raise NonFiniteError(message)
        tokens_per_s = self.clock.tick(len(records))
        records[-1].update(tokens_per_s=tokens_per_s, elapsed_s=self.clock.elapsed,
                           scalars={k: float(v) for k, v in trainer.fetch(trainer.scalars()).items()})
        self.append(records)
        loss = float(np.mean([r["loss"] for r in records]))
        show = restart_clock if first else advance
        show(self.bar, step, loss=f"{loss:.4f}", lr=f"{records[-1]['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        # the summary's loss is the last step's, as metrics.jsonl has it: the bar's mean since the last fetch was the
        # mean of however many steps --log-every, --eval-every and --save-every had left since (1 to 10 of them)
        self.summary.update(step=step, loss=records[-1]["loss"], tokens_per_s=self.clock.mean_rate())

    def evaluate(self, trainer: Trainer, step: int) -> None:
        """The mean loss over the fixed validation batches, logged and shown next to the corpus's entropy. A routed
        model's val_loss is its causal (predictor-mode) forward's; the top-k forward's, which reads future tokens,
        is logged beside it as val_loss_topk and val_ppl_topk (docs/routing.md)."""
        losses = trainer.fetch([trainer.eval_loss(b) for b in self.val_batches])
        val_loss = float(np.mean([x["loss"] for x in losses]))
        entropy = self.run.data.entropy
        record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        if "loss_topk" in losses[0]:
            val_loss_topk = float(np.mean([x["loss_topk"] for x in losses]))
            record.update(val_loss_topk=val_loss_topk, val_ppl_topk=perplexity(val_loss_topk))
        if entropy is not None:
            record["entropy"] = entropy
        self.append([record])
        note = f"; the corpus's entropy rate (the best achievable) is {entropy:.4f}" if entropy is not None else ""
        self.bar_note(f"step {step}: val loss {val_loss:.4f}, perplexity {perplexity(val_loss):.2f}{note}")
        self.summary.update({k: v for k, v in record.items() if k.startswith("val_")}, entropy=entropy)
        self.clock.pause()

    def save(self, trainer: Trainer, step: int) -> None:
        """A checkpoint of the (finite) state after update `step`, then only the newest `keep` kept."""
        run = self.run
        info = {"backend": trainer.name, "data_position": {"seed": run.cfg.seed, "step": step},
                "eval_batches": run.eval_batches,  # the validation set a resume evaluates on
                "cadence": {k: getattr(run, k) for k in CADENCE_MIN},  # what a resume keeps unless given again
                # how a resume reads raw .bin tokens without --data-dtype (None: tokens no file format stores)
                "data_dtype": dtype if (dtype := run.data.train.dtype.name) in TOKEN_DTYPES else None,
                "spec": run.spec.to_dict(), "train_config": run.cfg.to_dict(), "data": run.data.describe()}
        state = trainer.train_state()  # every process: gathering a sharded state is a collective
        if self.main:
            size = sum(x.nbytes for key in ("weights", *MOMENTS) for x in state[key].values())
            with writing(run.out / checkpoint_name(step), size, quiet=not self.progress):  # llama-1b's: 17 GB
                path = save_train_checkpoint(run.out, state, run.spec, info, run.data.tokenizer)
            prune_checkpoints(run.out, run.keep)
            self.summary["checkpoint"] = str(path)
        self.clock.pause()

    def append(self, records: list[dict]) -> None:
        if self.main:
            append_metrics(self.metrics_path, records)

    def nonfinite_message(self, record: dict) -> str:
        """Which quantity went non-finite at which step, the first tensor that did (found by a replay), what is kept."""
        step = record["step"]
        what = "loss" if not math.isfinite(record["loss"]) else "gradient"
        self.bar_note(f"step {step}: non-finite {what}; replaying the step to find the first non-finite tensor")
        good = [c for c in list_checkpoints(self.run.out) if checkpoint_step(c) < step]
        found, record["nonfinite"] = diagnose(self.run, self.make_trainer, step, good[-1] if good else None)
        return (f"non-finite {what} at step {step}: {found}; "
                f"the last good checkpoint is {good[-1] if good else 'none (no checkpoint was written yet)'}")

    def bar_note(self, text: str) -> None:
        if self.progress:
            tqdm.write(text, file=sys.stderr)


class Clock:
    """Tokens per second between log points, leaving out the first step (compilation) and eval/save pauses."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.started = tokens_per_step, time.perf_counter()
        self.last, self.elapsed, self.counted_steps, self.counted_s = self.started, 0.0, 0, 0.0
        self.first = True

    def tick(self, steps: int) -> float:
        """Steps done since the last tick; their tokens per second."""
        now = time.perf_counter()
        rate = steps * self.tokens_per_step / max(now - self.last, 1e-9)
        if not self.first:
            self.counted_steps, self.counted_s = self.counted_steps + steps, self.counted_s + now - self.last
        self.first, self.last, self.elapsed = False, now, now - self.started
        return rate

    def pause(self) -> None:
        """Restart the interval after work that is not training (an eval, a checkpoint)."""
        self.last = time.perf_counter()

    def mean_rate(self) -> float | None:
        return self.counted_steps * self.tokens_per_step / self.counted_s if self.counted_s else None


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def metric_order(metrics: dict) -> list[str]:
    """A train step's metric names in the order metrics.jsonl writes them, the same for both twins: loss, grad_norm,
    lr, then the rest (routing's terms) by name. A jitted JAX step returns its dict's keys sorted, torch's as built."""
    lead = [k for k in ("loss", "grad_norm", "lr") if k in metrics]
    return lead + sorted(k for k in metrics if k not in lead)


def finite_step(record: dict) -> bool:
    return math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows float64 past ~709


def describe(run: Run, step: int) -> str:
    """One line on what is trained on what, from where to where."""
    n_params = sum(math.prod(t.shape) for t in layout(run.spec))
    data = run.data
    line = (f"{n_params / 1e6:.2f}M parameters ({run.spec.norm_type}, {run.spec.norm_placement}), "
            f"data {data.source} ({len(data.train):,} train / {len(data.val):,} val tokens), "
            f"steps {step} -> {run.stop} of {run.cfg.steps}, out {run.out}")
    if data.entropy is not None:
        line += (f"; the corpus's entropy rate is {data.entropy:.4f} nats/token (perplexity "
                 f"{math.exp(data.entropy):.2f})")
    return line


# --- which tensor went non-finite first ------------------------------------------------------------


def diagnose(run: Run, make_trainer: Callable[[dict], Trainer], step: int,
             checkpoint: Path | None) -> tuple[str, float | None]:
    """Replay the run from `checkpoint` (else its start) to update `step`: the first non-finite tensor there,
    and the fraction of the gradients' values that are NaN/Inf.

    Same-twin replays are bit-exact on CPU; on devices whose kernels are not deterministic the
    replay may not reproduce the failure, and says so.
    """
    state = load_train_checkpoint(checkpoint)[0] if checkpoint else run.start()
    trainer = make_trainer(state)
    for s in range(state["step"] + 1, step):
        trainer.step(run.batch(s))
    weights, taps, loss, grads = trainer.inspect(run.batch(step))
    fraction = float(sum((~np.isfinite(g)).sum() for g in grads.values()) / sum(g.size for g in grads.values()))
    found = first_nonfinite(weights, taps, loss, grads)
    return found or f"the replay from step {state['step']} stayed finite (non-deterministic kernels?)", fraction


def first_nonfinite(weights: dict, taps: dict, loss: float, grads: dict) -> str | None:
    """The first NaN/Inf in the order things are computed: parameters, activations, the loss, gradients."""
    found = first_bad("parameter", weights) or first_bad("activation", flat_taps(taps))
    if found or not math.isfinite(loss):
        return found or "the loss itself is the first non-finite value (parameters and activations are finite)"
    return first_bad("gradient of", grads)


def first_bad(kind: str, tensors: dict) -> str | None:
    for name, x in tensors.items():
        x = np.asarray(x, np.float32)
        if bad := int(x.size - np.isfinite(x).sum()):
            return f"the first non-finite tensor is {kind} {name} ({bad} of {x.size} values NaN/Inf)"
    return None
