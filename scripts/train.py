"""Train either twin on the embedded synthetic corpus, a token file or text, with checkpoints either twin resumes.

    python scripts/train.py --backend jax                     # tiny on the synthetic corpus, ~20 s on 2 CPU cores
    python scripts/train.py --backend jax --spec tiny-dyt --out runs/dyt --steps 400 --stop-at 200   # DyT, half...
    python scripts/train.py --backend torch --out runs/dyt --resume                                   # ...the rest in PyTorch
    python scripts/prepare_data.py input.txt --out data/text --tokenizer bpe --vocab-size 2048
    python scripts/train.py --backend torch --data data/text --set lr=3e-3 --set steps=2000

Both twins read the same batches (a pure function of the seed and the step) and write the same
checkpoints (canonical weights and AdamW moments), so a run continues in either framework.
Progress goes to stderr, metrics to OUT/metrics.jsonl, a JSON summary to stdout. Bad input is one
`error:` line and exit code 2; a non-finite loss or gradient stops the run with exit code 1, naming
the step and the first tensor that went non-finite, and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from tqdm import tqdm

from shared_config import (
    CheckpointError, ModelSpec, TrainConfig, check_weights, flat_taps, init_weights, layout, load_spec, load_train_config,
)
from shared_config.compile_cache import add_compile_cache_option, use_compile_cache
from shared_config.cli import Parser, UsageError, fail, run as run_main
from shared_config.data import TOKEN_DTYPES, TokenData, load_data
from shared_config.files import atomic_write
from shared_config.limits import quote
from shared_config.parallel import parse_mesh, rows_per_shard
from shared_config.resources import ResourceError, check_memory, is_out_of_memory, train_bytes
from shared_config.progress import advance, progress, restart_clock
from shared_config.run_dir import (
    CHECKPOINT, append_metrics, latest_checkpoint, list_checkpoints, load_train_checkpoint, lock_run, prune_checkpoints,
    read_state, recover_run_dir, save_train_checkpoint, truncate_metrics, write_json,
)
from shared_config.config_file import check_keys, parse_overrides
from shared_config.train_config import MEMORY_OPTIONS

DEFAULT_SPEC = "tiny"  # with the data's vocabulary size when no --spec is given
DEFAULT_TRAIN_CONFIG = "cpu"
SPEC_KEYS = [f.name for f in fields(ModelSpec)]
TRAIN_KEYS = [f.name for f in fields(TrainConfig)]  # a key in both (compute_dtype) is the run's setting


# --- what to train ---------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one run needs, resolved from the command line (and the checkpoint it resumes)."""

    spec: ModelSpec  # the model as this run computes it (the train config's compute_dtype applied)
    cfg: TrainConfig
    data: TokenData
    out: Path
    start: Callable[[], dict]  # the canonical train state to start from: a checkpoint's, or step 0
    stop: int  # the last update of this invocation (cfg.steps, or --stop-at)
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate at the end only
    save_every: int = 100  # 0: save at the end only
    keep: int = 3
    eval_batches: int = 8
    info: dict | None = None  # recorded in run.json: the command, the backend

    def batch(self, step: int) -> np.ndarray:
        """The batch of update `step` (1-based): a pure function of the seed and the step."""
        return self.data.batch(self.cfg.seed, step - 1, self.cfg.batch_size, self.cfg.seq_len)


def split_overrides(items: list[str] | None) -> tuple[dict, dict]:
    """`--set key=value` items as (spec changes, train config changes); unknown keys get the closest one suggested."""
    spec_changes, cfg_changes = {}, {}
    overrides = parse_overrides(items)
    check_keys(overrides, list(dict.fromkeys(SPEC_KEYS + TRAIN_KEYS)), "--set")
    for key, value in overrides.items():
        (cfg_changes if key in TRAIN_KEYS else spec_changes)[key] = value
    return spec_changes, cfg_changes


def resolve_run(args) -> Run:
    """The run the arguments ask for: a fresh one, or the checkpoint in --out continued (--resume)."""
    spec_changes, cfg_changes = split_overrides(args.set)
    cfg_changes.update({k: getattr(args, k) for k in ("steps", "seed") if getattr(args, k) is not None})
    checkpoint, stored = resumed_checkpoint(args) if args.resume else (None, None)
    # `is not None` throughout: an empty --spec/--data/--train-config is an error, not "not given"
    data = load_data(args.data if args.data is not None else stored["data"]["source"] if stored else "synthetic",
                     args.data_dtype)
    init = read_init(args.init_from, load_spec(args.spec).replace(**spec_changes) if args.spec is not None else None)
    cfg = with_changes(base_config(args, stored), cfg_changes)
    spec = cfg.model_spec(base_spec(args, stored, init, data).replace(**spec_changes))
    data.check(cfg.seq_len, spec.V)
    memory = {k: getattr(cfg, k) for k in MEMORY_OPTIONS}  # every memory option counts
    check_memory(train_bytes(spec, cfg.batch_size, cfg.seq_len, **memory), f"training {spec.L} layers of d_model {spec.D}, "
                 f"vocab {spec.V:,} at batch {cfg.batch_size} x seq {cfg.seq_len}",
                 "lower batch_size/seq_len (--set batch_size=N) or the model's sizes")  # before init allocates
    if stored:
        check_resume(spec, cfg, data, stored)
        start = partial(checkpoint_state, checkpoint)
    else:
        refuse_used_out(args.out)  # after the inputs: the first error a user sees is the real one
        weights = init[0] if init else init_weights(spec, cfg.seed)
        check_weights(weights, spec, args.init_from or "init")
        start = partial(fresh_state, weights)
    stop = min(cfg.steps, args.stop_at) if args.stop_at else cfg.steps
    cadence = {k: getattr(args, k) for k in ("log_every", "eval_every", "save_every", "keep", "eval_batches")}
    return Run(spec, cfg, data, args.out, start, stop, **cadence, info={"backend": args.backend, "argv": args.argv})


def refuse_file_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; a run directory is a directory (pass another --out)")


def refuse_used_out(out: Path) -> None:
    """A fresh run never writes into a run directory that holds checkpoints (or into a file)."""
    refuse_file_out(out)
    if latest_checkpoint(out) is not None:
        raise UsageError(f"{out} holds checkpoints already: pass --resume to continue that run, or another --out")


def resumed_checkpoint(args) -> tuple[Path, dict]:
    """The latest checkpoint in --out and its state.json (--resume)."""
    refuse_file_out(args.out)
    checkpoint = latest_checkpoint(args.out)
    if checkpoint is None:
        raise UsageError(f"{args.out}: no checkpoint to resume (run without --resume to start)")
    if args.init_from:
        raise UsageError("--init-from starts a new run and --resume continues one: pass one of them")
    stored = read_state(checkpoint)  # every copy of the spec and config in the checkpoint agrees, or refused
    if missing := [k for k in ("spec", "train_config", "data") if not isinstance(stored.get(k), dict)]:
        raise CheckpointError(f"{checkpoint / 'state.json'}: missing {', '.join(missing)}")
    return checkpoint, stored


def checkpoint_state(path: Path) -> dict:
    return load_train_checkpoint(path)[0]


def read_init(path: Path | None, spec: ModelSpec | None) -> tuple[dict, ModelSpec] | None:
    """--init-from's weights and spec, in any format convert.py reads (shared_config.formats); a given spec must match."""
    if path is None:
        return None
    from shared_config.formats import quiet_libraries, read_checkpoint

    quiet_libraries()
    return read_checkpoint(path, spec)


def base_spec(args, stored, init, data: TokenData) -> ModelSpec:
    """--spec, else the resumed run's, else the --init-from file's, else tiny with the data's vocabulary."""
    if args.spec is not None:
        return load_spec(args.spec)
    if stored:
        return load_spec(stored["spec"])
    if init:
        return init[1]
    return load_spec(DEFAULT_SPEC).replace(vocab_size=data.vocab_size)


def base_config(args, stored) -> TrainConfig:
    """--train-config, else the resumed run's, else the cpu preset."""
    if args.train_config is not None:
        return load_train_config(args.train_config)
    return TrainConfig.from_dict(stored["train_config"]) if stored else load_train_config(DEFAULT_TRAIN_CONFIG)


def with_changes(cfg: TrainConfig, changes: dict) -> TrainConfig:
    """`cfg` with --set/--steps/--seed applied; a --steps below the warmup shortens the warmup with it."""
    if "steps" in changes and "warmup_steps" not in changes:
        changes = {**changes, "warmup_steps": min(cfg.warmup_steps, changes["steps"])}
    return cfg.replace(**changes)


def check_resume(spec: ModelSpec, cfg: TrainConfig, data: TokenData, stored: dict) -> None:
    """A resumed run is the run that was checkpointed: the same spec, train config (but steps and the memory options)
    and data."""
    pairs = [(f"spec {k}", stored["spec"].get(k), v) for k, v in spec.to_dict().items()]
    pairs += [(k, stored["train_config"].get(k), v) for k, v in cfg.to_dict().items() if k not in ("steps", *MEMORY_OPTIONS)]
    pairs += [(f"data {k}", stored["data"].get(k), v) for k, v in data.describe().items() if k != "source"]
    if diffs := [f"{what}: checkpoint {quote(a)}, now {quote(b)}" for what, a, b in pairs if a != b]:
        raise UsageError(f"--resume continues the run as it was checkpointed, but {'; '.join(diffs)} "
                         "(start a new --out to change them)")
    if (steps := stored["train_config"]["steps"]) != cfg.steps:
        print(f"note: steps {steps} -> {cfg.steps}: the lr schedule changes from here", file=sys.stderr)


def fresh_state(weights: dict) -> dict:
    """A canonical train state at step 0: `weights` and AdamW moments of zero."""
    return {"step": 0, "weights": weights, **{key: {k: np.zeros_like(w) for k, w in weights.items()} for key in ("m", "v")}}


# --- the twins in the loop -------------------------------------------------------------------------


class Backend(Protocol):
    """One twin's side of the loop: the model, its train state and its compiled steps (both classes below)."""

    name: str

    def step(self, tokens_BN: np.ndarray) -> dict: ...  # one update; device-scalar metrics, no host sync
    def eval_loss(self, tokens_BN: np.ndarray): ...  # device scalars: loss (causal), routed specs also loss_topk
    def scalars(self) -> dict: ...  # alpha, shift, embed_scale by canonical name, device scalars
    def fetch(self, tree): ...  # device values -> numpy (waits for them)
    def train_state(self) -> dict: ...  # canonical {"step", "weights", "m", "v"}
    def inspect(self, tokens_BN: np.ndarray) -> tuple[dict, dict, float, dict]: ...  # weights, taps, loss, grads


class JaxBackend:
    """The JAX twin: `jax.jit` train and eval steps over a donated train state."""

    name = "jax"

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, train_state: dict, compile: bool = True, mesh: str | None = None):
        import jax

        import jax_model
        from jax_model import sharding, train

        jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls as torch computes them (no TF32)
        self.jax, self.train = jax, train
        self.model = jax_model.from_weights(train_state["weights"], spec)
        self.state = train.set_train_state(self.model, train.init_train_state(self.model, cfg), train_state)
        self.train_step = train.make_train_step(self.model, cfg, compile=compile)  # compile=False: eager, for debugging
        if mesh is not None:  # the same step over a device mesh: parameters and moments over fsdp, batch rows over all
            device_mesh = sharding.make_mesh(mesh)
            self.state = jax.device_put(self.state, sharding.state_shardings(self.model, cfg, device_mesh))
            self.train_step = sharding.make_train_step(self.model, cfg, device_mesh)
        self.eval_step = train.make_eval_step(self.model, compile=compile)

    def step(self, tokens_BN):
        self.state, metrics = self.train_step(self.state, tokens_BN)
        return metrics

    def eval_loss(self, tokens_BN):
        return self.eval_step(self.state, tokens_BN)

    def scalars(self):
        return self.train.scalar_params(self.model, self.state)

    def fetch(self, tree):
        return self.jax.device_get(tree)

    def train_state(self):
        return self.train.get_train_state(self.model, self.state)

    def inspect(self, tokens_BN):
        from flax import nnx

        nnx.update(self.model, self.state.params)
        taps = self.train.forward_taps(self.model, tokens_BN[:, :-1])
        loss, grads = self.train.loss_and_grads(self.model, tokens_BN)
        return self.train_state()["weights"], taps, loss, grads


class TorchBackend:
    """The torch twin: eager (or `torch.compile`d) steps updating the model and AdamW in place."""

    name = "torch"

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, train_state: dict, compile: bool = False,
                 parallel: str | None = None):
        import torch

        import torch_model
        from torch_model import distributed, train
        from torch_model.weights import whole

        self.torch, self.train, self.whole = torch, train, whole
        device = distributed.init_distributed()  # this rank's device under torchrun; else cuda if present, or cpu
        self.model = torch_model.from_weights(train_state["weights"], spec, device=device)
        self.get_train_state = train.get_train_state
        if parallel is None:
            self.state = train.set_train_state(self.model, train.init_train_state(self.model, cfg), train_state)
            self.train_step = train.make_train_step(self.model, cfg, compile=compile)
        else:  # DDP or FSDP2 over torchrun's ranks: the weights are loaded whole first, FSDP2 then shards them
            self.state, self.train_step = distributed.parallelize(self.model, cfg, parallel, compile=compile)
            self.state = distributed.set_train_state(self.model, self.state, train_state)
            self.get_train_state = distributed.get_train_state
        self.eval_step = train.make_eval_step(self.model, compile=compile)

    def step(self, tokens_BN):
        return self.train_step(self.state, tokens_BN)[1]

    def eval_loss(self, tokens_BN):
        return self.eval_step(self.state, tokens_BN)

    def scalars(self):
        return self.train.scalar_params(self.model, self.state)

    def fetch(self, tree):
        return self.torch.utils._pytree.tree_map(lambda x: self.whole(x).detach().float().cpu().numpy(), tree)

    def train_state(self):
        return self.get_train_state(self.model, self.state)

    def inspect(self, tokens_BN):
        taps = self.train.forward_taps(self.model, tokens_BN[:, :-1])
        loss, grads = self.train.loss_and_grads(self.model, tokens_BN)
        return self.train_state()["weights"], taps, loss, grads


BACKENDS = {"jax": JaxBackend, "torch": TorchBackend}


def backend_factory(name: str, run: Run, compile: bool | None = None, mesh: str | None = None,
                    parallel: str | None = None) -> Callable[[dict], Backend]:
    """`make_backend(train_state)` for the twin `name`; compile=None keeps the twin's default; `mesh` (JAX) or
    `parallel` (torch under torchrun) scale the same step out."""
    options = {} if compile is None else {"compile": compile}
    options.update({"mesh": mesh} if mesh else {"parallel": parallel} if parallel else {})
    return partial(BACKENDS[name], run.spec, run.cfg, **options)


def is_main_process() -> bool:
    """Process 0 of a torchrun (RANK) or multi-process JAX (JAX_PROCESS_ID) run, or the only process: the one that
    writes the run directory and reports. Every process trains; all of them take part in gathering a checkpoint."""
    return int(os.environ.get("RANK", os.environ.get("JAX_PROCESS_ID", "0"))) == 0


# --- the loop --------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run; the message names the step and the first bad tensor."""


class Loop:
    """The backend-neutral loop: batches, metrics, evaluation, checkpoints, the non-finite stop."""

    def __init__(self, run: Run, make_backend: Callable[[dict], Backend], progress: bool = True):
        self.main = is_main_process()  # scaled out, every process runs the loop; process 0 alone writes and reports
        self.run, self.make_backend, self.progress = run, make_backend, progress and self.main
        self.metrics_path = run.out / "metrics.jsonl"
        self.val_batches = run.data.val_batches(run.eval_batches, run.cfg.batch_size, run.cfg.seq_len)
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
        self.summary: dict = {}

    def __call__(self) -> dict:
        """Train from `run.start()` to `run.stop`; the summary of the last step."""
        run = self.run
        state = run.start()
        self.prepare(state["step"])
        if state["step"] >= run.stop:
            self.bar_note(f"nothing to do: the run is at step {state['step']} and --stop-at/steps is {run.stop}")
            return {"step": state["step"], "checkpoint": str(latest_checkpoint(run.out))}
        backend = self.make_backend(state)
        first, self.clock = state["step"] + 1, Clock(run.cfg.batch_size * run.cfg.seq_len)
        with progress(total=run.stop, initial=state["step"], desc=backend.name, quiet=not self.progress,
                      dynamic_ncols=True) as self.bar:
            for step in range(first, run.stop + 1):
                self.pending.append((step, backend.step(run.batch(step))))
                last = step == run.stop
                evaluate, save = last or due(step, run.eval_every), last or due(step, run.save_every)
                if step == first or due(step, run.log_every) or evaluate or save:  # the first: compilation timed apart
                    self.flush(backend, step, first=step == first)
                if evaluate:
                    self.evaluate(backend, step)
                if save:
                    self.save(backend, step)
        return self.summary

    def prepare(self, step: int) -> None:
        """The output directory: run.json and tokenizer.json on a fresh start; metrics cut back to `step`."""
        run = self.run
        if not self.main:
            return
        run.out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, step)
        if step == 0:
            write_json(run.out / "run.json", {**(run.info or {}), "spec": run.spec.to_dict(),
                                              "train_config": run.cfg.to_dict(), "data": run.data.describe()})
        if run.data.tokenizer is not None:
            tokenizer = run.data.tokenizer.read_bytes()
            atomic_write(run.out / "tokenizer.json", lambda tmp: tmp.write_bytes(tokenizer))
        self.bar_note(describe(run, step))

    def flush(self, backend: Backend, step: int, first: bool = False) -> None:
        """Fetch the pending metrics, stop on a non-finite one, log them (with the scalars at `step`); after the
        `first` step (compilation) the bar's clock restarts, so that its ETA counts the steps after."""
        fetched = backend.fetch([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        records = [{"kind": "train", "step": s, **{k: float(v) for k, v in m.items()}} for s, m in zip(steps, fetched)]
        for r in records:  # any NaN/Inf gradient makes the norm non-finite: the fraction is 0 exactly while it is finite
            r["nonfinite"] = 0.0 if math.isfinite(r["grad_norm"]) else None  # else counted by the replay below
        self.pending = []
        if bad := next((r for r in records if not finite_step(r)), None):
            message = self.nonfinite_message(bad)
            self.append([r for r in records if r["step"] <= bad["step"]])
            raise NonFiniteError(message)
        tokens_per_s = self.clock.tick(len(records))
        records[-1].update(tokens_per_s=tokens_per_s, elapsed_s=self.clock.elapsed,
                           scalars={k: float(v) for k, v in backend.fetch(backend.scalars()).items()})
        self.append(records)
        loss = float(np.mean([r["loss"] for r in records]))
        show = restart_clock if first else advance
        show(self.bar, step, loss=f"{loss:.4f}", lr=f"{records[-1]['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self.summary.update(step=step, loss=loss, tokens_per_s=self.clock.mean_rate())

    def evaluate(self, backend: Backend, step: int) -> None:
        """The mean loss over the fixed validation batches, logged and shown next to the corpus's entropy. A routed
        model's val_loss is its causal (predictor-mode) forward's; the top-k forward's, which reads future tokens,
        is logged beside it as val_loss_topk and val_ppl_topk (README "Routing")."""
        losses = backend.fetch([backend.eval_loss(b) for b in self.val_batches])
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

    def save(self, backend: Backend, step: int) -> None:
        """A checkpoint of the (finite) state after update `step`, then only the newest `keep` kept."""
        run = self.run
        info = {"backend": backend.name, "data_position": {"seed": run.cfg.seed, "step": step},
                "spec": run.spec.to_dict(), "train_config": run.cfg.to_dict(), "data": run.data.describe()}
        state = backend.train_state()  # every process: gathering a sharded state is a collective
        if self.main:
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
        found, record["nonfinite"] = diagnose(self.run, self.make_backend, step, good[-1] if good else None)
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


def finite_step(record: dict) -> bool:
    return math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows float64 past ~709


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT.fullmatch(path.name).group(1))


def describe(run: Run, step: int) -> str:
    """One line on what is trained on what, from where to where."""
    n_params = sum(math.prod(t.shape) for t in layout(run.spec))
    data = run.data
    line = (f"{n_params / 1e6:.2f}M parameters ({run.spec.norm_type}, {run.spec.norm_placement}), "
            f"data {data.source} ({len(data.train):,} train / {len(data.val):,} val tokens), "
            f"steps {step} -> {run.stop} of {run.cfg.steps}, out {run.out}")
    if data.entropy is not None:
        line += f"; the corpus's entropy rate is {data.entropy:.4f} nats/token (perplexity {math.exp(data.entropy):.2f})"
    return line


# --- which tensor went non-finite first ------------------------------------------------------------


def diagnose(run: Run, make_backend: Callable[[dict], Backend], step: int, checkpoint: Path | None) -> tuple[str, float | None]:
    """Replay the run from `checkpoint` (else its start) to update `step`: the first non-finite tensor there,
    and the fraction of the gradients' values that are NaN/Inf.

    Same-twin replays are bit-exact on CPU; on devices whose kernels are not deterministic the
    replay may not reproduce the failure, and says so.
    """
    state = load_train_checkpoint(checkpoint)[0] if checkpoint else run.start()
    backend = make_backend(state)
    for s in range(state["step"] + 1, step):
        backend.step(run.batch(s))
    weights, taps, loss, grads = backend.inspect(run.batch(step))
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


# --- the command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=sorted(BACKENDS), help="the twin that trains")
    p.add_argument("--spec", help=f"preset name or YAML path (default: {DEFAULT_SPEC} with the data's vocabulary size)")
    p.add_argument("--train-config", help=f"train preset name or YAML path (default: {DEFAULT_TRAIN_CONFIG})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec or train config key (repeatable)")
    p.add_argument("--data", help="synthetic[:SEED] (default), a prepare_data.py directory, a .bin/.npy token file, or text")
    p.add_argument("--data-dtype", choices=TOKEN_DTYPES, help="dtype of a .bin token file (default: its meta.json, else uint16)")
    p.add_argument("--out", type=Path, help="the run directory (default: runs/SPEC)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, written by either twin")
    p.add_argument("--init-from", type=Path, help="start from these weights (any format convert.py reads)")
    p.add_argument("--steps", type=int, help="total updates (the schedule's length); shorthand for --set steps=N")
    p.add_argument("--seed", type=int, help="init and batch-order seed; shorthand for --set seed=N")
    p.add_argument("--stop-at", type=int, help="stop after this update without changing the schedule (resume later)")
    p.add_argument("--log-every", type=int, default=10, help="fetch metrics and log alpha/shift/embed_scale every N steps")
    p.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (0: at the end only)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep", type=int, default=3, help="keep the newest K checkpoints (0: all)")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile the steps (JAX always jits)")
    p.add_argument("--devices", type=int, help="JAX: data-parallel over N devices (a data=N mesh)")
    p.add_argument("--mesh", help="JAX: a device mesh, e.g. data=2,fsdp=4 (parameters and moments over fsdp)")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"],
                   help="torch under torchrun: DDP or FSDP2 (default under torchrun: ddp)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_compile_cache_option(p)
    args = p.parse_args(argv)
    for name in ("log_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_every", "save_every", "keep"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.stop_at is not None and args.stop_at < 1:
        p.error("--stop-at must be >= 1")
    check_scale_out(p, args)
    args.out = args.out if args.out is not None else Path("runs") / Path(args.spec or DEFAULT_SPEC).stem
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def check_scale_out(p, args) -> None:
    """--devices/--mesh go with JAX, torchrun with torch; on CPU a JAX mesh needs that many host devices, which
    XLA reads once, before JAX starts (GPUs are counted as they are)."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.devices is not None and args.devices < 1:
        p.error("--devices must be >= 1")
    if args.devices and args.mesh:
        p.error("--devices N and --mesh: pass one (--devices N is --mesh data=N)")
    if (args.devices or args.mesh) and args.backend != "jax":
        p.error("--devices/--mesh scale the JAX twin; the torch twin scales out under torchrun (--parallel ddp|fsdp2)")
    if args.parallel and not torchrun:
        p.error(f"--parallel {args.parallel} needs torchrun: torchrun --nproc_per_node=N scripts/train.py --backend torch ...")
    if torchrun and args.backend != "torch":
        p.error("under torchrun train the torch twin (--backend torch); JAX scales out with --devices/--mesh")
    args.parallel = args.parallel or ("ddp" if torchrun else None)
    args.mesh = args.mesh or (f"data={args.devices}" if args.devices else None)
    if args.mesh:
        devices = math.prod(parse_mesh(args.mesh).values())
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def main(argv=None):
    args = parse_args(argv)
    run = resolve_run(args)
    shards = math.prod(parse_mesh(args.mesh).values()) if args.mesh else int(os.environ.get("WORLD_SIZE", "1"))
    rows_per_shard(run.cfg.batch_size, shards)  # the global batch splits evenly, or fail before any work
    use_compile_cache(args.compile_cache)
    if args.backend == "jax":
        from jax_model.sharding import init_distributed

        init_distributed()  # several JAX processes: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
        from jax_model.attention import device_platform

        device_platform()  # JAX_PLATFORMS naming a missing platform: one error line before the run directory is made
    try:
        make_backend = backend_factory(args.backend, run, args.compile or None, args.mesh, args.parallel)
        with lock_run(run.out) if is_main_process() else contextlib.nullcontext():
            if is_main_process():
                recover_run_dir(run.out)  # what a killed run left: half-built checkpoints, a cut-short prune
                if latest_checkpoint(run.out) != (resumed_checkpoint(args)[0] if args.resume else None):
                    raise ResourceError(f"{run.out}: another process wrote a checkpoint while this run started")
            summary = Loop(run, make_backend, progress=not args.quiet)()
    except NonFiniteError as e:
        fail(str(e), 1)
    except Exception as e:
        if is_out_of_memory(e):
            raise ResourceError(f"the {args.backend} training job ran out of memory at batch {run.cfg.batch_size} x "
                                f"seq {run.cfg.seq_len}: lower them (--set batch_size=N, --set seq_len=N)") from e
        raise
    finally:
        if args.parallel:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if is_main_process():
        print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
