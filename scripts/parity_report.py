"""Run both twins on the same input and print, stage by stage, where they agree and where they part.

    python scripts/parity_report.py --spec tiny-dyt
    python scripts/parity_report.py --weights model.safetensors --dtype bfloat16 --json report.json
    python scripts/parity_report.py --spec tiny --train-steps 100 --plot curves.png

One row per stage, in the order the model computes them: embeddings, every block's attention output,
MLP output and residual stream, the final norm, logits, loss, then the gradient of every canonical
tensor (and, with --train-steps, the loss of every step and the trained parameters). The first FAIL
row is where a mismatch starts. Exit code 1 when any row fails, 2 on bad arguments, 3 when the report cannot
fit in memory (refused before any work).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared_config import (
    init_weights, layout, load_spec, load_train_config, parse_overrides, synthetic_batch,
)
from shared_config import parity as P
from shared_config.cli import Parser, UsageError, at_least, check_outputs, check_shorthands, nonempty, printable, run
from shared_config.curves import plain_text
from shared_config.files import save_figure
from shared_config.formats import quiet_libraries, read_checkpoint
from shared_config.formats.checks import check_weights
from shared_config.progress import progress as progress_bar
from shared_config.report import report_on_stdout, write_report
from shared_config.limits import spelled
from shared_config.resources import check_memory, report_bytes
from shared_config.run import SPEC_KEYS, check_train_memory
from shared_config.twins import twin


@dataclass
class Row:
    stage: str
    measure: str  # what `value` is
    value: float
    max_abs: float | None  # max|Δ|, where the stage compares arrays
    tol: float
    passed: bool
    margin: float | None = None  # tol / value: how far inside its bound a passing row is


def compare(stage: str, a, ref, tol: float, measure: str = "max|Δ|/std") -> Row:
    """An array row: max|Δ| over the reference's std (float32 activations) or over its max|x|."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    value = P.rel_err(a, ref) if measure == "max|Δ|/std" else P.max_rel(a, ref)
    return Row(stage, measure, value, float(np.abs(a - ref).max()), tol, bool(value <= tol), margin(value, tol))


def bound(stage: str, measure: str, value: float, tol: float, at_least: bool = False) -> Row:
    """A scalar row: passes when value <= tol (value >= tol for agreements)."""
    passed = bool(value >= tol if at_least else value <= tol)
    return Row(stage, measure, float(value), None, tol, passed, None if at_least else margin(value, tol))


def margin(value: float, tol: float) -> float | None:
    return float(tol / value) if value > 0 else None


# --- the twins, framework by framework ---------------------------------------------------------------


def jax_run(weights, spec, tokens_BN):
    """Taps, logits, loss and canonical gradients of the JAX twin."""
    import jax.numpy as jnp

    model, taps = twin("jax").from_weights(weights, spec), {}
    logits = model(jnp.asarray(tokens_BN[:, :-1]), taps=taps)
    return to_numpy(taps), np.asarray(logits), *twin("jax", "train").loss_and_grads(model, tokens_BN)


def torch_run(weights, spec, tokens_BN):
    """Taps, logits, loss and canonical gradients of the torch twin."""
    import torch

    model, taps = twin("torch").from_weights(weights, spec), {}
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens_BN[:, :-1]), taps=taps)
    taps = {k: {n: x.float() for n, x in v.items()} if isinstance(v, dict) else v.float() for k, v in taps.items()}
    return to_numpy(taps), logits.numpy(), *twin("torch", "train").loss_and_grads(model, tokens_BN)


def rounding_floors(weights, spec, tokens_BN, torch_taps, torch_logits) -> dict[str, float]:
    """float32's rounding floor at every forward stage, in max|Δ|/std: how far the torch twin's taps move when
    every weight is rounded once more (`parity.nudged`), the scale of one stage's own rounding."""
    taps, logits, *_ = torch_run(P.nudged(weights), spec, tokens_BN)
    floors = {"logits": P.rel_err(logits, torch_logits)}
    for name, x in taps.items():
        for part, y in (x.items() if isinstance(x, dict) else [("", x)]):
            stage = f"{name}.{part}" if part else name
            floors[stage] = P.rel_err(y, torch_taps[name][part] if part else torch_taps[name])
    return floors


def to_numpy(taps: dict) -> dict:
    return {k: to_numpy(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in taps.items()}


def trajectories(weights, spec, cfg, progress, floor: bool = False):
    """Per-step losses and the final canonical weights of each twin, on the same batches; `floor`: also the torch
    twin's from `nudged` weights ("floor"), whose distance from its own run is the trajectory's rounding floor."""
    out = {}
    runs = [("jax", "jax", weights), ("torch", "torch", weights), *([("floor", "torch", P.nudged(weights))] * floor)]
    for name, backend, start in runs:
        model, train = twin(backend).from_weights(start, spec), twin(backend, "train")
        state, step, losses = train.init_train_state(model, cfg), train.make_train_step(model, cfg), []
        for i in range(cfg.steps):
            state, metrics = step(state, synthetic_batch(cfg.seed, i, cfg.batch_size, cfg.seq_len, spec.V))
            losses.append(metrics["loss"])
            progress.update()
        out[name] = ([float(x) for x in losses], train.get_train_state(model, state)["weights"])
    return out


# --- rows ------------------------------------------------------------------------------------------


def forward_rows(jax_taps, torch_taps, jax_logits, torch_logits, spec, bf16: bool, floors=None) -> list[Row]:
    """One row per stage. bf16: one flat bound; float32: FLOOR_FACTOR times that stage's rounding floor
    (`rounding_floors`), at least float32's epsilon, so that no correct run touches its bound by rounding alone."""
    # bf16 differences are roundings of the largest values: measured against max|x|, not std
    measure = "max|Δ|/max|x|" if bf16 else "max|Δ|/std"

    def tol(stage: str) -> float:
        return P.BF16_FORWARD_TOL if bf16 else P.FLOOR_FACTOR * max(floors[stage], float(np.finfo(np.float32).eps))

    rows = [compare("model.embed", jax_taps["model.embed"], torch_taps["model.embed"], tol("model.embed"), measure)]
    for i in range(spec.L):
        layer = f"model.layers.{i}"
        if "router_keep" in torch_taps[layer]:  # a routed layer: its selection first, then what it computed
            rows.append(agreement_row(layer, jax_taps[layer]["router_keep"], torch_taps[layer]["router_keep"]) if bf16
                        else selection_row(layer, torch_taps[layer]["router_score"], spec, floors))
        for part in ("attn_out", "mlp_out", "residual"):
            stage = f"{layer}.{part}"
            rows.append(compare(stage, jax_taps[layer][part], torch_taps[layer][part], tol(stage), measure))
    rows.append(compare("model.norm", jax_taps["model.norm"], torch_taps["model.norm"], tol("model.norm"), measure))
    rows.append(compare("logits", jax_logits, torch_logits, tol("logits"), measure))
    if bf16:
        kl = P.token_kl(jax_logits, torch_logits)
        rows.append(bound("logits KL mean", "KL(torch‖jax)", kl.mean(), P.BF16_KL_MEAN))
        rows.append(bound("logits KL max", "KL(torch‖jax)", kl.max(), P.BF16_KL_MAX))
        rows.append(bound("logits top-1", "agreement", P.top1_agreement(jax_logits, torch_logits), P.BF16_TOP1, True))
    return rows


SELECTION = "selection margin"
ROUTED_ALIKE = "routed alike"
SELECTION_HINT = ("the k-th and (k+1)-th router scores are within float32's rounding of each other, so either twin "
                  "may route the other token and the rows after this layer compare different computations; judge "
                  "parity on other weights or tokens (--seed)")


def selection_row(layer: str, score_BT, spec, floors: dict) -> Row:
    """A routed layer's top-k selection, decidable in float32 or not: the smallest gap between a batch row's k-th and
    (k+1)-th score (the torch twin's), relative to max|score|, must exceed FLOOR_FACTOR times the scores' rounding
    floor (and float32's epsilon). DTF's score is a difference of two nearly equal mean squares: at init, gaps of an
    ulp, or exact ties, occur; a compiled step rounds them otherwise (XLA's fusions) and the twins then route
    different tokens, which failed the loss and every gradient after it while the forward rows passed by a floor
    that a flipped selection had inflated to pass anything. An exact tie counts as a gap of 0: JAX's jitted
    gradient broke ties its eager forward kept."""
    score_BT = np.asarray(score_BT, np.float64)
    k = spec.routed_tokens(score_BT.shape[1])
    ranked = -np.sort(-score_BT, axis=1)
    scale = max(np.abs(score_BT).max(), np.finfo(np.float64).tiny)
    gap = float((ranked[:, k - 1] - ranked[:, k]).min() / scale) if 0 < k < score_BT.shape[1] else np.inf
    floor = floors[f"{layer}.router_score"] * score_BT.std() / scale
    return bound(f"{layer}.{SELECTION}", "gap/max|score|", gap,
                 P.FLOOR_FACTOR * max(floor, float(np.finfo(np.float32).eps)), at_least=True)


def agreement_row(layer: str, jax_keep_BT, torch_keep_BT) -> Row:
    """A routed layer's selection in bf16: the fraction of tokens both twins route alike (kept or skipped), at least
    BF16_TOP1 as the logits' top-1 agreement: bf16 rounds scores near the k-th apart, so up to 2% of the tokens may
    be routed otherwise (at seq 512, five swaps per row); the row shows any below 1. float32's rows hold the gap to
    the rounding floor instead (`selection_row`). The bf16 report had no routing row: its flat bounds passed routing
    the twins did not share, unseen."""
    alike = float((np.asarray(jax_keep_BT) == np.asarray(torch_keep_BT)).mean())
    return bound(f"{layer}.{ROUTED_ALIKE}", "agreement", alike, P.BF16_TOP1, at_least=True)


def loss_rows(jax_loss, torch_loss, jax_grads, torch_grads, spec, bf16: bool) -> list[Row]:
    if bf16:
        rows = [bound("loss", "|Δ|", abs(jax_loss - torch_loss), P.BF16_LOSS_TOL)]
    else:
        rows = [bound("loss", "|Δ|/|loss|", float(P.loss_rel(jax_loss, torch_loss)), P.LOSS_TOL)]
    tol = P.BF16_GRAD_TOL if bf16 else P.GRAD_TOL
    names = [t.name for t in layout(spec)]  # module order, so the first failing gradient is the earliest tensor
    return rows + [compare(f"grad {n}", jax_grads[n], torch_grads[n], tol, "max|Δ|/max|g|") for n in names]


def train_rows(runs: dict, bf16: bool, cfg) -> list[Row]:
    """The losses of every step, and the trained tensor nearest its bound. bf16: flat bounds;
    float32: TRAJ_LOSS_TOL and TRAJ_PARAM_TOL, or FLOOR_FACTOR times the trajectory's own rounding floor where that
    is larger (the torch twin trained from `nudged` weights): AdamW's first updates, lr·g/(|g| + eps), turn
    float32's noise on a near-zero gradient into lr-sized steps (tiny's first step moved a weight 1.03e-4 of
    max|p| apart, over TRAJ_PARAM_TOL, in a correct run)."""
    (jax_losses, jax_weights), (torch_losses, torch_weights) = runs["jax"], runs["torch"]
    a, b = np.asarray(jax_losses), np.asarray(torch_losses)
    label = f"{len(b)} steps, batch {cfg.batch_size} x seq {cfg.seq_len}"  # the train config's, not --batch/--seq
    if bf16:
        loss_row = bound(f"train loss, {label}", "max |Δ|", np.abs(a - b).max(), P.BF16_LOSS_TOL)
        tols = dict.fromkeys(torch_weights, P.BF16_GRAD_TOL)
    else:
        floor_losses, floor_weights = runs["floor"]
        loss_floor = P.loss_rel(floor_losses, b).max()
        loss_row = bound(f"train loss, {label}", "max |Δ|/|loss|", P.loss_rel(a, b).max(),
                         max(P.TRAJ_LOSS_TOL, P.FLOOR_FACTOR * loss_floor))
        tols = {name: max(P.TRAJ_PARAM_TOL, P.FLOOR_FACTOR * P.max_rel(floor_weights[name], p))
                for name, p in torch_weights.items()}
    ratios = {name: P.max_rel(jax_weights[name], p) / tols[name] for name, p in torch_weights.items()}
    # the tensor nearest its bound, or furthest past it; a NaN first: max() passes over a NaN it meets after a number
    # (NaN > x is false), so a twin's NaN weights were reported by a finite tensor's PASS
    worst = max(ratios, key=lambda name: math.inf if math.isnan(ratios[name]) else ratios[name])
    return [loss_row, compare(f"trained {worst} (worst)", jax_weights[worst], torch_weights[worst], tols[worst],
                              "max|Δ|/max|p|")]


# --- output ----------------------------------------------------------------------------------------


def report_json(spec, args, rows: list[Row], runs: dict | None = None, cfg=None, train_spec=None,
                complete: bool = True) -> dict:
    """The report: "passed" is null while rows are still to come and none has failed (a stopped run said it passed
    without its training rows); "batch" and "seq" are the forward's and gradients', the training's are its config's
    (`cfg`, training `train_spec`)."""
    failed = [r.stage for r in rows if not r.passed]
    # the weights and the seed (of the init and of the tokens) too: two reports of one spec were told apart by neither
    out = {"spec": spec.to_dict(), "weights": args.weights, "seed": args.seed, "dtype": spec.compute_dtype,
           "batch": args.batch, "seq": args.seq,
           "rows": [asdict(r) for r in rows], "first_failure": failed[0] if failed else None,
           "passed": False if failed else True if complete else None}
    if runs:
        out["train"] = {"config": cfg.to_dict(), "dtype": train_spec.compute_dtype,
                        "jax_loss": runs["jax"][0], "torch_loss": runs["torch"][0]}
    return out


def print_table(rows: list[Row]) -> None:
    width = max(len(r.stage) for r in rows)
    print(f"{'stage':<{width}}  {'measure':<15} {'value':>10} {'max|Δ|':>10} {'tol':>8} {'margin':>7}  result")
    for r in rows:
        max_abs = "" if r.max_abs is None else f"{r.max_abs:.2e}"
        margin_ = "" if r.margin is None else f"{r.margin:.1f}x"
        print(f"{r.stage:<{width}}  {r.measure:<15} {r.value:>10.2e} {max_abs:>10} {r.tol:>8.2g} {margin_:>7}  "
              f"{'PASS' if r.passed else 'FAIL'}")
    failed = [r for r in rows if not r.passed]
    print(f"first failure: {failed[0].stage}" if failed else f"all {len(rows)} stages pass")
    if failed and failed[0].stage.endswith(SELECTION):
        print(f"note: {SELECTION_HINT}")


@plain_text
def plot(runs: dict, path: Path, title: str, bf16: bool, tol: float) -> None:
    """The twins' training losses, and their difference against the loss row's bound `tol`."""
    import matplotlib.pyplot as plt

    a, b = np.asarray(runs["jax"][0]), np.asarray(runs["torch"][0])
    diff = np.abs(a - b) if bf16 else P.loss_rel(a, b)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(a, label="jax")
    top.plot(b, "--", label="torch")
    top.set(ylabel="loss", title=title)
    top.legend()
    bottom.semilogy(np.where(diff > 0, diff, np.nan), ".")  # steps where the losses are equal are left out
    bottom.axhline(tol, color="red", lw=0.8, label="tolerance")
    bottom.set(ylabel="|Δloss|" if bf16 else "|Δloss| / loss", xlabel="step")
    bottom.legend()
    fig.tight_layout()
    save_figure(fig, path)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    # neither has a default: the model needs one of them
    p.add_argument("--spec", type=nonempty,
                   help="preset name or YAML path; give --spec, --weights or both (--spec alone: weights drawn by "
                        "init_weights(spec, --seed); with --weights: the spec of a file that carries none, else "
                        "checked against the file's)")
    p.add_argument("--weights", type=nonempty,
                   help="a checkpoint in any format from_pretrained reads: a .safetensors or .pt file, a run's step "
                        "directory, an Orbax, Hugging Face or flash-linear-attention directory (--weights alone: the "
                        "spec it carries)")
    p.add_argument("--set", action="append", type=p.key_item(SPEC_KEYS, "spec"), metavar="KEY=VALUE",
                   help="override a spec key (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype of both twins (default: the spec's)")
    p.add_argument("--seq", type=at_least(1), default=256, help="positions the model reads")
    p.add_argument("--batch", type=at_least(1), default=2, help="sequences per batch")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the init and the input tokens")
    p.add_argument("--train-steps", type=at_least(0), default=0, help="also train both twins this many steps")
    p.add_argument("--train-config", type=nonempty,
                   help="train config preset or YAML path, for --train-steps (default: parity)")
    p.add_argument("--plot", type=Path, help="loss curves and their difference: .png, .pdf, .svg (needs --train-steps)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if not (args.spec or args.weights):
        raise UsageError("give --spec, --weights or both")
    check_outputs(args.json, args.plot, inputs=[("--spec", args.spec), ("--weights", args.weights),
                                             ("--train-config", args.train_config)])  # fail now, not after the run
    check_shorthands(parse_overrides(args.set), {"compute_dtype": ("--dtype", args.dtype)} if args.dtype else {})
    for flag, value in (("--plot", args.plot), ("--train-config", args.train_config)):  # else ignored silently
        if value and args.train_steps <= 0:
            raise UsageError(f"{flag} needs --train-steps N")
    return args


def main(argv=None):
    args = parse_args(argv)
    with report_on_stdout(args.json):  # `--json -`: the table goes to stderr
        return prepare_and_report(args)


def prepare_and_report(args):
    if args.weights:
        quiet_libraries()
        weights, spec = read_checkpoint(args.weights, load_spec(args.spec) if args.spec else None)
    else:
        spec = load_spec(args.spec)
    changes = parse_overrides(args.set)
    if args.dtype:  # --dtype wins over the spec (with --set compute_dtype: refused in parse_args)
        changes["compute_dtype"] = args.dtype
    spec = spec.replace(**changes)
    if args.weights and changes:  # a --set that changes the model's tensors: "weights: unexpected keys" named neither
        sets = "".join(f" --set {k}={spelled(v)}" for k, v in changes.items())  # --dtype's as its --set
        check_weights(weights, spec, f"--weights {args.weights} with{sets}")
    if not 0 < args.seq <= spec.max_seq_len:
        raise UsageError(f"--seq {args.seq} must be in 1..max_seq_len={spec.max_seq_len}")
    if (fewest := P.fewest_attended(spec, args.seq)) is not None and fewest < 2:  # rows FAILed on noise; 0: KeyError
        raise UsageError(f"--seq {args.seq}: an attention layer attends over {fewest} token(s) a sequence, so its "
                         "q_proj and k_proj gradients are zero and their rows would compare rounding noise (at 0 it "
                         f"never runs); raise --seq{' or the routing_capacity' if spec.routing != 'none' else ''}")
    cfg = None
    if args.train_steps > 0:
        cfg = load_train_config(args.train_config or "parity")
        cfg = cfg.replace(steps=args.train_steps, warmup_steps=min(cfg.warmup_steps, args.train_steps))
        cfg.model_spec(spec)  # checks seq_len against the spec
    check_fits(spec, args, cfg)
    if not args.weights:  # after every check: bad arguments fail before any work
        weights = init_weights(spec, args.seed)
    return report(weights, spec, args, cfg)


def check_fits(spec, args, cfg) -> None:
    """Refuse (ResourceError, exit 3) a report, or its --train-steps training, that cannot fit in memory, before
    anything is allocated: the machine would otherwise kill it part-way, with no error line."""
    check_memory(report_bytes(spec, args.batch, args.seq),
                 f"comparing {spec.L} layers of d_model {spec.D}, vocab {spec.V:,} at batch {args.batch:,} x seq "
                 f"{args.seq}", "lower --batch or --seq, or the model's sizes (--set)")
    if cfg:
        check_train_memory(spec, cfg, "lower the train config's batch_size/seq_len (--train-config)")


def report(weights, spec, args, cfg) -> int:
    twin("jax", "precision").exact_float32()  # true float32 matmuls on every device
    twin("torch", "precision").exact_float32()
    tokens_BN = synthetic_batch(args.seed, 0, args.batch, args.seq, spec.V)
    bf16 = spec.compute_dtype == "bfloat16"
    # the training's dtype is its config's (compute_dtype in a train config), judged by that dtype's bounds; float32
    # trains a third run, the torch twin's from nudged weights (the trajectory's rounding floor)
    train_spec = cfg.model_spec(spec) if cfg else None
    train_bf16 = train_spec is not None and train_spec.compute_dtype == "bfloat16"
    train_steps = cfg.steps * (2 if train_bf16 else 3) if cfg else 0
    with progress_bar(total=2 + train_steps, desc="parity report", quiet=args.quiet) as progress:
        jax_taps, jax_logits, jax_loss, jax_grads = jax_run(weights, spec, tokens_BN)
        progress.update()
        torch_taps, torch_logits, torch_loss, torch_grads = torch_run(weights, spec, tokens_BN)
        progress.update()
        floors = None if bf16 else rounding_floors(weights, spec, tokens_BN, torch_taps, torch_logits)
        rows = forward_rows(jax_taps, torch_taps, jax_logits, torch_logits, spec, bf16, floors)
        rows += loss_rows(jax_loss, torch_loss, jax_grads, torch_grads, spec, bf16)
        if cfg:  # the forward and gradient rows on disk before the training stage: a stopped run keeps them
            write_report(args.json, report_json(spec, args, rows, complete=False), complete=False)
        runs = trajectories(weights, train_spec, cfg, progress, floor=not train_bf16) if cfg else None
    if runs:
        rows += train_rows(runs, train_bf16, cfg)
    print_table(rows)
    write_report(args.json, report_json(spec, args, rows, runs, cfg, train_spec), complete=True)
    if args.plot:
        loss_tol = next(r.tol for r in rows if r.stage.startswith("train loss"))
        plot(runs, args.plot, f"{printable(args.spec or args.weights)}, {train_spec.compute_dtype}", train_bf16,
             loss_tol)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    run(main)
