"""scripts/parity_report.py: a clean run passes; a mismatch planted in one twin is reported first at
the stage where it starts (forward or backward); JSON, plot and one-line errors."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_model
from shared_config import load_spec, save_checkpoint
from shared_config.cli import UsageError, run

from ..support.common import interleaved_rope, load_script, parity_weights


@pytest.fixture(scope="module")
def report():
    return load_script("parity_report")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """tiny-dyt with GELU (so an activation can be planted) and O(1) logits."""
    spec = load_spec("tiny-dyt").replace(mlp="gelu")
    path = tmp_path_factory.mktemp("report") / "tiny-dyt-gelu.safetensors"
    save_checkpoint(path, parity_weights(spec), spec)
    return str(path)


def run_report(report, weights_file, tmp_path, *extra):
    out = tmp_path / "report.json"
    code = report.main(["--weights", weights_file, "--seq", "64", "--batch", "1", "--json", str(out), *extra])
    return code, json.loads(out.read_text())


def dyt_without_alpha_gradient(self, x):
    """The same forward, but alpha is cut out of the graph: only the gradients can tell."""
    y = torch.tanh(self.alpha.detach().float() * x.float())
    return torch_model.layers.affine(y, self.weight, self.bias).to(x.dtype)


@pytest.mark.slow
def test_clean_run_passes(report, weights_file, tmp_path, capsys):
    code, result = run_report(report, weights_file, tmp_path)
    assert code == 0 and result["passed"] and result["first_failure"] is None
    stages = [r["stage"] for r in result["rows"]]
    assert stages[:4] == ["model.embed", "model.layers.0.attn_out", "model.layers.0.mlp_out", "model.layers.0.residual"]
    assert {"model.norm", "logits", "loss", "grad model.layers.0.input_layernorm.alpha"} <= set(stages)
    assert set(result["rows"][0]) == {"stage", "measure", "value", "max_abs", "tol", "passed", "margin"}
    # float32 bounds come from each stage's own rounding floor: a correct run stays well inside every one
    forward = [r for r in result["rows"] if not r["stage"].startswith(("loss", "grad "))]
    assert all(r["margin"] is None or r["margin"] >= 4 for r in forward), [(r["stage"], r["margin"]) for r in forward]
    assert len({r["tol"] for r in forward}) > 1  # per stage, not one flat bound
    assert capsys.readouterr().out.rstrip().endswith(f"all {len(result['rows'])} stages pass")


# each plant changes the torch twin only; the stage where the report must first say FAIL
PLANTS = {
    "interleaved-rope": (lambda mp: mp.setattr(torch_model.attention, "apply_rope", interleaved_rope),
                         "model.layers.0.attn_out"),
    "tanh-gelu": (
        lambda mp: mp.setitem(torch_model.layers.ACTIVATIONS, "gelu", lambda x: F.gelu(x, approximate="tanh")),
        "model.layers.0.mlp_out",
    ),
    "alpha-detached": (
        lambda mp: mp.setattr(torch_model.layers.DynamicTanh, "forward", dyt_without_alpha_gradient),
        "grad model.layers.0.input_layernorm.alpha",
    ),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_mismatch_is_found_where_it_starts(report, weights_file, tmp_path, monkeypatch, capsys, plant):
    apply, first_failure = PLANTS[plant]
    apply(monkeypatch)
    code, result = run_report(report, weights_file, tmp_path)
    assert code == 1 and result["first_failure"] == first_failure
    assert f"first failure: {first_failure}" in capsys.readouterr().out


@pytest.mark.slow
def test_train_steps_and_plot(report, weights_file, tmp_path):
    plot = tmp_path / "curves.png"
    code, result = run_report(report, weights_file, tmp_path, "--train-steps", "3", "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["train"]["jax_loss"]) == len(result["train"]["torch_loss"]) == 3
    assert [r["stage"] for r in result["rows"]][-2] == "train loss, 3 steps, batch 4 x seq 32"  # the parity config's


@pytest.mark.slow
def test_the_trajectory_is_judged_at_its_own_rounding_floor_and_in_its_own_dtype(report, tmp_path):
    """tiny's first AdamW step failed a correct run: lr·g/(|g| + eps) turns float32's noise on a near-zero gradient
    into an lr-sized step (o_proj 1.03e-4 of max|p| apart, over TRAJ_PARAM_TOL). Each trained tensor's bound is now
    FLOOR_FACTOR times its own floor (the torch twin trained from weights rounded once more) where that is larger.
    A bf16 train config (compute_dtype) was judged by float32's bounds, and the report said float32."""
    from shared_config.parity import BF16_GRAD_TOL, BF16_LOSS_TOL, TRAJ_PARAM_TOL

    out = tmp_path / "r.json"
    assert report.main(["--spec", "tiny", "--seq", "8", "--batch", "1", "--train-steps", "1", "--quiet", "--json",
                        str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["train"]["dtype"] == "float32" and result["rows"][-1]["tol"] >= TRAJ_PARAM_TOL
    config = tmp_path / "bf16.yaml"
    config.write_text("compute_dtype: bfloat16\n")
    code = report.main(["--spec", "tiny", "--seq", "8", "--batch", "1", "--train-steps", "2", "--train-config",
                        str(config), "--quiet", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["train"]["dtype"] == "bfloat16" and result["dtype"] == "float32"
    assert [r["tol"] for r in result["rows"][-2:]] == [BF16_LOSS_TOL, BF16_GRAD_TOL]


@pytest.mark.parametrize("args,message", [
    (["--spec", "tiny", "--seq", "999"], "--seq 999 must be in 1..max_seq_len=256"),
    # one position: attention's q_proj and k_proj gradients are zero, and their rows FAILed on rounding noise (exit 1)
    (["--spec", "tiny", "--seq", "1", "--batch", "1"], "--seq 1: an attention layer attends over 1 token(s)"),
    # a routed block's floor(0.125 x 8) = 1 token: the same; at 0 tokens its taps were missing, a KeyError traceback
    (["--spec", "tiny", "--set", "routing=mod", "--seq", "8"], "--seq 8: an attention layer attends over 1 token(s)"),
    (["--spec", "tiny", "--set", "routing=dtf", "--seq", "4"], "over 0 token(s) a sequence, so its q_proj and k_proj "
                                                               "gradients are zero and their rows would compare "
                                                               "rounding noise (at 0 it never runs); raise --seq or "
                                                               "the routing_capacity"),
    (["--spec", "tiny", "--set", "n_head=2"], "unknown spec key 'n_head' (did you mean 'n_heads'?)"),
    (["--spec", "tiny", "--plot", "x.png"], "--plot needs --train-steps N"),
    (["--spec", "nope"], "no spec preset or file named 'nope'"),
    (["--spec", "tiny", "--dtype", "float16"], "argument --dtype: invalid choice"),
    (["--spec", "tiny", "--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    (["--spec", "tiny", "--train-steps", "-1"], "argument --train-steps: must be an integer >= 0, got -1"),
    (["--spec", "tiny", "--train-steps", "2", "--plot", "x.jpgx"],
     "--plot x.jpgx: the file must end in .png, .pdf, .svg"),
    (["--spec", "tiny", "--json", "/no/such/dir/r.json"], "/no/such/dir is not a directory"),
])
def test_bad_arguments_are_one_line_errors(report, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(report.main, args)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err


def test_a_set_that_contradicts_an_option_or_the_weights_is_named(report, weights_file, capsys):
    """`--dtype float32 --set compute_dtype=bfloat16` ran float32 without a word; `--set n_layers=2` on 3-layer
    weights was "weights: unexpected keys", naming neither the file nor the --set."""
    for args, says in ((["--spec", "tiny", "--dtype", "float32", "--set", "compute_dtype=bfloat16"],
                        "--dtype float32 and --set compute_dtype=bfloat16: --dtype is shorthand"),
                       (["--weights", weights_file, "--set", "n_layers=2"],
                        f"--weights {weights_file} with --set n_layers=2: unexpected keys: model.layers.2."),
                       (["--weights", weights_file, "--set", "embed_norm=true"],  # as typed, not "embed_norm=True"
                        f"--weights {weights_file} with --set embed_norm=true: missing keys: model.embed_norm.")):
        with pytest.raises(SystemExit) as e:
            run(report.main, args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1, err


@pytest.mark.parametrize("extra, says", [
    (["--batch", "10000000"], "comparing 3 layers of d_model 96, vocab 257 at batch 10,000,000 x seq 8 needs about"),
    (["--train-steps", "2", "--train-config", "huge.yaml"], "training 3 layers of d_model 96, vocab 257 at batch "
                                                            "10000000 x seq 8 needs about"),
], ids=["report", "train-steps"])
def test_a_report_that_cannot_fit_in_memory_is_refused_before_any_work(report, tmp_path, monkeypatch, capsys, extra,
                                                                       says):
    """As train.py: one error line with the estimate and what to lower, exit 3, before weights are drawn or a twin
    runs (--batch 100,000 grew to 24 GB and was killed by the machine with no error line)."""
    (tmp_path / "huge.yaml").write_text("batch_size: 10000000\nseq_len: 8\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "init_weights", lambda *a: pytest.fail("weights drawn before the memory check"))
    with pytest.raises(SystemExit) as e:
        run(report.main, ["--spec", "tiny", "--seq", "8", "--quiet", *extra])
    out, err = capsys.readouterr()
    assert e.value.code == 3 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and says in err and "GiB of memory" in err and "lower " in err, err


def test_help_claims_no_default_for_the_model_it_needs(report, capsys):
    """Neither --spec nor --weights has a default: their help says so as the error does, instead of each naming the
    other as its default (which read as if both could be left out)."""
    with pytest.raises(SystemExit) as e:
        report.parse_args(["--help"])
    help_ = capsys.readouterr().out
    assert e.value.code == 0
    for option, following in (("--spec SPEC", "--weights"), ("--weights WEIGHTS", "--set")):
        text = " ".join(re.search(rf"^  {option}(.*?)^  {following}", help_, re.S | re.M)[1].split())
        assert "default" not in text, text
    assert "give --spec, --weights or both" in " ".join(help_.split())
    assert ".png, .pdf, .svg (needs --train-steps)" in " ".join(help_.split())  # it said PNG, and took all three
    with pytest.raises(UsageError, match="give --spec, --weights or both"):
        report.parse_args([])


@pytest.mark.slow
def test_a_routed_selection_within_rounding_of_flipping_is_named_as_the_first_failure(report, tmp_path, capsys):
    """DTF at init holds ties within an ulp (or exact ties a compiled step breaks otherwise): the twins routed other
    tokens, and the report failed the loss and every gradient, a twin bug by its look, while the forward rows passed
    by a floor the flip had inflated. Each routed layer's top-k gap is now a row before its outputs, and a note says
    what a failure there means; MoD's scores, apart, pass it."""
    out = tmp_path / "r.json"
    assert report.main(["--spec", "tiny", "--set", "routing=dtf", "--seq", "32", "--batch", "2", "--quiet", "--json",
                        str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["first_failure"] == "model.layers.1.selection margin"
    assert "note: the k-th and (k+1)-th router scores are within float32's rounding" in capsys.readouterr().out
    assert report.main(["--spec", "tiny", "--set", "routing=mod", "--seq", "32", "--batch", "2", "--quiet", "--json",
                        str(out)]) == 0
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["model.layers.1.selection margin"]["passed"] and "model.layers.0.selection margin" not in rows


@pytest.mark.slow
def test_a_bf16_report_judges_each_routed_layer_s_selection(report, tmp_path):
    """A bf16 report had no routing row: its flat bounds passed a layer whose twins routed other tokens, unseen.
    Each routed layer now has the fraction of tokens both twins route alike, held to the logits' top-1 bound."""
    out = tmp_path / "r.json"
    assert report.main(["--spec", "tiny", "--set", "routing=mod", "--dtype", "bfloat16", "--seq", "32", "--batch",
                        "2", "--quiet", "--json", str(out)]) == 0
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    routed = rows["model.layers.1.routed alike"]  # bf16 may swap a near-tie: within the bound, not necessarily 1
    assert routed["passed"] and routed["value"] >= 0.98 and "model.layers.0.routed alike" not in rows
    keep = np.arange(64).reshape(2, 32) % 2 == 0
    flipped = keep.copy()
    flipped[1, 4:6] = flipped[1, 5:3:-1]  # one token kept for another: the top-k keeps k
    assert report.agreement_row("model.layers.1", keep, keep).passed
    assert not report.agreement_row("model.layers.1", flipped, keep).passed  # 62 of 64 alike: under 0.98


def test_a_constant_reference_is_measured_on_its_magnitude():
    """Over std 0, rel_err was NaN for twins that agree exactly (0/0: a FAIL) and inf for any rounding."""
    from shared_config.parity import rel_err

    assert rel_err([3.0, 3.0], [3.0, 3.0]) == 0.0
    assert rel_err([3.0 + 3e-7, 3.0], [3.0, 3.0]) == pytest.approx(1e-7)
    assert rel_err([0.0], [0.0]) == 0.0 and rel_err([1.0, 3.0], [0.0, 2.0]) == 1.0  # std 1: as before


def test_a_loss_of_zero_is_compared_not_divided_by(report, recwarn):
    """A vocabulary of one token (or logits certain of every next token) has a loss of exactly 0: the loss row was a
    ZeroDivisionError traceback, the per-step train row a NumPy warning and NaN (compare_norms.py's gap too). Twins
    that agree pass; any difference over a loss of 0 fails."""
    from shared_config.parity import loss_rel

    scripts_norms = load_script("compare_norms")
    spec = load_spec("tiny").replace(n_layers=1)
    grads = {t.name: np.ones(2) for t in report.layout(spec)}
    row = report.loss_rows(0.0, 0.0, grads, grads, spec, bf16=False)[0]
    assert row.stage == "loss" and row.value == 0.0 and row.passed
    assert not report.loss_rows(1e-9, 0.0, grads, grads, spec, bf16=False)[0].passed
    weights = {"w": np.ones(3)}
    runs = {"jax": ([0.0, 0.0], weights), "torch": ([0.0, 0.0], weights), "floor": ([0.0, 0.0], weights)}
    train = report.train_rows(runs, False, report.load_train_config("parity"))
    assert train[0].value == 0.0 and train[0].passed
    assert loss_rel([0.0, 2.0], [0.0, 1.0]).tolist() == [0.0, 1.0]
    rows = {b: {"losses": [0.0, 0.0], "stopped_at": None} for b in ("jax", "torch")}
    assert scripts_norms.twin_gap(rows) == 0.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
