"""The studies' --seeds: every configuration trained once per seed, into its own run, reported as the mean ± standard
deviation over the seeds and judged on the means (a single seed's difference between two norms or routings can be
the seed's). Unit tests on made-up rows, and two short real studies (torch, one layer, 2 steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shared_config.cli import UsageError
from shared_config.study import over_seeds, plus_minus

from ..support.common import ROOT, load_script

SMALL = ["--steps", "2", "--set", "batch_size=2", "--set", "seq_len=16", "--set", "n_layers=1", "--quiet"]


def test_over_seeds_means_the_numbers_and_keeps_every_seeds_row():
    rows = {0: {"val_ppl": 10.0, "acc": None, "nonfinite_steps": 0, "stopped_at": None, "losses": [1.0], "e": 2.5},
            1: {"val_ppl": 14.0, "acc": 0.5, "nonfinite_steps": 1, "stopped_at": 7, "losses": [2.0], "e": 2.5},
            2: {"val_ppl": 12.0, "acc": 0.7, "nonfinite_steps": 1, "stopped_at": 3, "losses": [3.0], "e": 2.5}}
    row = over_seeds(rows)
    assert row["val_ppl"] == 12.0 and row["val_ppl_std"] == pytest.approx(2.0)  # sample std (ddof 1)
    assert row["acc"] is None and row["acc_std"] is None  # seed 0 has none: no mean of the others
    assert row["nonfinite_steps"] == 2 and (row["stopped_at"], row["stopped_seed"]) == (3, 2)  # the earliest stop
    assert row["losses"] is None and row["e"] == 2.5  # a list that differs has no one value; a shared number stays
    assert row["seeds"] == {"0": rows[0], "1": rows[1], "2": rows[2]}
    one = over_seeds({5: rows[0]})
    assert one["val_ppl"] == 10.0 and one["val_ppl_std"] is None and list(one["seeds"]) == ["5"]


def test_a_seeded_routing_study_trains_each_seed_into_its_own_run(tmp_path, capsys):
    """Each seed is its own run (weights and batch order differ, so do the losses), and the row is their mean."""
    routing = load_script("compare_routing")
    routing.main(["--configs", "dense", "--backends", "torch", "--seeds", "0,3", "--out", str(tmp_path), *SMALL])
    table = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dense-torch-seed0", "dense-torch-seed3"]
    report = json.loads((tmp_path / "routing.json").read_text())
    assert report["seeds"] == [0, 3]
    row = report["results"]["dense"]["torch"]
    each = [row["seeds"][s]["val_ppl"] for s in ("0", "3")]
    assert each[0] != each[1] and row["val_ppl"] == pytest.approx(np.mean(each))
    assert row["val_ppl_std"] == pytest.approx(np.std(each, ddof=1))
    assert "means ± standard deviations over seeds 0, 3" in table
    assert f"| dense | torch | {np.mean(each):.3f} ± {np.std(each, ddof=1):.3f} |" in table
    run_json = json.loads((tmp_path / "runs" / "dense-torch-seed3" / "run.json").read_text())
    assert run_json["train_config"]["seed"] == 3


def test_a_seeded_norm_study_judges_the_means(tmp_path, capsys):
    """The criteria read the means over the seeds and count every seed's run; the output criterion compares each
    seed's DyT run with the RMSNorm run of the same seed."""
    norms = load_script("compare_norms")
    norms.main(["--configs", "rms-pre,dyt-pre", "--backends", "torch", "--seeds", "1,2", "--out", str(tmp_path),
                *SMALL])
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "norms.json").read_text())["results"]
    rms, dyt = results["rms-pre"]["torch"], results["dyt-pre"]["torch"]
    ppl = {c: [r["seeds"][s]["val_ppl"] for s in ("1", "2")] for c, r in (("rms", rms), ("dyt", dyt))}
    gap = np.mean(ppl["dyt"]) - np.mean(ppl["rms"])
    assert f"({gap:+.2f})" in table and "| no NaN/Inf in any run | PASS | 4 runs finite |" in table
    tv = np.mean([[0.5 * np.abs(np.subtract(p, rms["seeds"][s]["outputs"][site])).sum()  # each seed against its own
                   for site, p in dyt["seeds"][s]["outputs"].items()] for s in ("1", "2")], axis=1)
    assert f"mean TV {np.mean(tv):.3f} ± {np.std(tv, ddof=1):.3f} (2 seeds) over " in table
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "dyt-pre-torch-seed1", "dyt-pre-torch-seed2", "rms-pre-torch-seed1", "rms-pre-torch-seed2"]


def test_the_norm_tables_loss_gap_and_stops_read_every_seed():
    """The twins' loss gap is the largest of any seed's pair of runs; a stop names its seed."""
    norms = load_script("compare_norms")

    def row(losses, stopped_at=None):
        return {"val_ppl": None if stopped_at else 15.0, "losses": losses, "stopped_at": stopped_at,
                "nonfinite_steps": int(stopped_at is not None)}

    rows = {"jax": over_seeds({0: row([2.0, 1.0]), 1: row([2.0, 1.0], stopped_at=2)}),
            "torch": over_seeds({0: row([2.0, 1.1]), 1: row([2.2, 1.0])})}
    assert norms.twin_gap(rows) == pytest.approx(0.2 / 2.2)  # seed 1's first step, before its stop
    # the cell named no seed, and the gap, seed 0's over both its steps, as "up to step 1", the stopped seed's
    assert norms.gap_cell(rows) == ("jax stopped at step 2, seed 1 (non-finite); 9.1e-02 over each seed's steps "
                                    "before a stop")
    judged = norms.unfinished("c", "dyt-pre", rows["jax"], "rms-pre", rows["torch"])
    assert judged == ("c", False, "dyt-pre stopped at step 2, seed 1 (non-finite)")


@pytest.mark.parametrize("given, said", [
    ("0,0", "--seeds: 0 is given twice"), ("-1", "--seeds: each seed must be an integer >= 0, got -1"),
    ("x", "--seeds: each seed must be an integer >= 0, got 'x'"), ("1.5", "--seeds: each seed must be an integer >= 0"),
    ("0,,1", "--seeds: '0,,1' holds an empty name"),
    ("0,\udcff", "--seeds: byte 0xff at character 2 is not UTF-8; pass UTF-8 text$")])
def test_bad_seeds_are_refused_before_any_run(given, said):
    for script in ("compare_norms", "compare_routing"):
        with pytest.raises(UsageError, match=f"^{said}"):
            load_script(script).parse_args(["--seeds", given])


def test_a_set_seed_beside_seeds_is_refused():
    """`--set seed=5 --seeds 0,1`: which seed a run had would depend on which one won."""
    with pytest.raises(UsageError, match="^--set seed: --seeds sets it per run"):
        load_script("compare_routing").parse_args(["--seeds", "0,1", "--set", "seed=5"])
    assert load_script("compare_routing").parse_args(["--set", "seed=5"]).seeds is None  # alone, as before


def test_a_seed_too_long_for_a_run_directory_name_is_refused_before_any_run(tmp_path):
    """`--seeds 0,<300 digits>` trained seed 0, then failed 'File name too long' naming no flag; the longest seed
    whose runs/CONFIG-BACKEND-seedSEED fits in 255 bytes is taken."""
    longest = 255 - len("mod-0.125-torch-seed")
    with pytest.raises(UsageError, match=r"^--seeds: seed 9999999999\.\.\.9999999999 \(300 digits\) makes a run "
                                         rf"directory name .* at most {longest} digits$"):
        load_script("compare_routing").parse_args(["--seeds", f"0,{'9' * 300}", "--configs", "dense,mod-0.125",
                                                   "--out", str(tmp_path / "out")])
    args = load_script("compare_routing").parse_args(["--seeds", "9" * longest, "--configs", "dense,mod-0.125"])
    assert args.seeds == [int("9" * longest)]
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="^--configs: "):  # a config name with no room for a seed: its own error
        load_script("compare_norms").parse_args(["--seeds", "0", "--configs", "x" * 246])


def test_a_spread_past_float64s_squares_is_a_number_not_inf(recwarn):
    """Two seeds' perplexities e^400 and e^380 (a diverging run's; the loop caps a loss at 700 nats): the squares
    of the deviations overflowed, the table read `± inf`, the JSON null, and numpy warned on stderr."""
    row = over_seeds({0: {"val_ppl": math.exp(400)}, 1: {"val_ppl": math.exp(380)}})
    assert row["val_ppl_std"] == pytest.approx((math.exp(400) - math.exp(380)) / math.sqrt(2))
    assert plus_minus(row, "val_ppl", ".3g", "-") == "2.61e+173 ± 3.69e+173" and not recwarn.list
    values = [14.857165513160414, 14.908250541115134, 14.862253018094965]  # the scaling changes no bit
    row = over_seeds({seed: {"val_ppl": v} for seed, v in enumerate(values)})
    assert (row["val_ppl"], row["val_ppl_std"]) == (float(np.mean(values)), float(np.std(values, ddof=1)))


def test_one_seed_is_named_as_one_seed_not_as_means():
    """`--seeds 5` headed its table "means ± standard deviations over seeds 5", above numbers without a ±."""
    row = over_seeds({5: {"val_ppl": 15.0, "val_loss": 2.7, "entropy": 2.6, "alpha_min": None, "alpha_max": None,
                          "grad_norm_var": None, "nonfinite_steps": 0, "stopped_at": None, "flops_per_token": 1e6,
                          "val_ppl_topk": None, "tokens_per_s": None, "predictor_acc": None}})
    for script, config in (("compare_norms", "rms-pre"), ("compare_routing", "dense")):
        table = load_script(script).markdown({config: {"torch": row}}, ["torch"], 2, "cmd")
        assert "seed 5" in table.splitlines()[0 if script == "compare_routing" else 2] and "means" not in table


def test_a_seeded_study_leaves_an_earlier_unseeded_run_of_its_configuration(tmp_path, capsys):
    """norm-study.md said the runs that stay on a reused --out are those of configurations this study has not: an
    unseeded study's dense-torch stays beside a seeded study's dense-torch-seed0, unread by its table."""
    routing = load_script("compare_routing")
    for seeds in ([], ["--seeds", "0"]):
        routing.main(["--configs", "dense", "--backends", "torch", *seeds, "--out", str(tmp_path), *SMALL])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dense-torch", "dense-torch-seed0"]
    assert list(json.loads((tmp_path / "routing.json").read_text())["results"]["dense"]["torch"]["seeds"]) == ["0"]
    assert "other seeds, and `CONFIG-BACKEND` beside `CONFIG-BACKEND-seedSEED`" in " ".join(
        (ROOT / "docs" / "norm-study.md").read_text().split())


@pytest.mark.parametrize("argv, said", [
    (["--seeds", "0,1", "--seeds", "2"], "argument --seeds: given twice ('0,1', then '2'); list every value in one "
                                         "--seeds, comma-separated"),
    (["--configs", "dense", "--configs", "mod-0.5"], "argument --configs: given twice ('dense', then 'mod-0.5')"),
    (["--backends", "jax", "--backends", "torch"], "argument --backends: given twice ('jax', then 'torch')")])
def test_a_list_option_given_twice_is_refused_not_the_last_kept(argv, said, capsys):
    """`--seeds 0,1 --seeds 2` trained seed 2 alone (argparse keeps the last), under a table that read like the
    study asked for; each list option of a study is refused in one line given twice, exit 2."""
    for script in ("compare_norms", "compare_routing"):
        with pytest.raises(SystemExit) as e:
            load_script(script).parse_args([*argv, "--out", "unused"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {said}"), lines
    assert load_script("compare_norms").parse_args(["--mixer", "gla", "--configs", "rms-pre"]).configs == ["rms-pre"]


def test_many_seeds_are_checked_for_repeats_in_linear_time():
    """no_repeats scanned the list before each item: 20,000 seeds took ~8 s to parse. Counted by comparisons (a
    repeat's check compares only values of one hash), not timed (a test asserts no wall-clock), then the real parse."""
    from shared_config.cli import no_repeats

    class Counted:
        compared = 0

        def __init__(self, n):
            self.n = n

        def __hash__(self):
            return self.n

        def __eq__(self, other):
            Counted.compared += 1
            return self.n == other.n

    no_repeats("--seeds", [Counted(n) for n in range(2000)])
    assert Counted.compared == 0  # the scan: ~2,000,000
    with pytest.raises(UsageError, match="^--sweep k: \\[1\\] is given twice$"):  # unhashable values still compared
        no_repeats("--sweep k", [[1], [2], [1]])
    args = load_script("compare_routing").parse_args(["--seeds", ",".join(map(str, range(20_000)))])
    assert len(args.seeds) == 20_000
    with pytest.raises(UsageError, match="^--seeds: 7 is given twice$"):
        load_script("compare_routing").parse_args(["--seeds", ",".join(map(str, [*range(20_000), 7]))])


def test_a_configurations_constants_get_no_spread_over_seeds():
    """The JSON gave the corpus's entropy (norm study) and the FLOPs per token (routing study), numbers no seed
    changes, a standard deviation of 0.0 as if measured; a constant that does differ is a number like any other."""
    rows = {s: {"val_ppl": 10.0 + s, "entropy": 2.59, "flops_per_token": 3e6} for s in range(3)}
    row = over_seeds(rows, ("entropy", "flops_per_token"))
    assert (row["entropy"], row["flops_per_token"]) == (2.59, 3e6) and row["val_ppl_std"] == 1.0
    assert "entropy_std" not in row and "flops_per_token_std" not in row
    rows[2]["entropy"] = 2.6
    assert over_seeds(rows, ("entropy",))["entropy_std"] == pytest.approx(np.std([2.59, 2.59, 2.6], ddof=1))
    for script, constants in (("compare_norms", ("entropy",)), ("compare_routing", ("flops_per_token",))):
        assert load_script(script).CONSTANTS == constants


@pytest.mark.parametrize("name", ["tiny-norms-seeds", "gla-tiny-norms-seeds", "gla-tiny-norms-seeds-final-alpha-2",
                                  "tiny-routing-study-seeds"])
def test_the_committed_seed_reports_rows_are_their_seeds_rows_over_seeds(name):
    """Each configuration's row in a committed report is over_seeds of its own seeds' rows, bit for bit: the
    reports lost the `entropy_std` / `flops_per_token_std` of 0.0 the study now writes no more, and nothing else."""
    report = json.loads((ROOT / "bench" / "results" / f"cpu-2vcpu-2026-12-07-{name}.json").read_text())
    constants = load_script("compare_routing" if "routing" in name else "compare_norms").CONSTANTS
    for by_backend in report["results"].values():
        for row in by_backend.values():
            assert over_seeds({int(s): r for s, r in row["seeds"].items()}, constants) == row
            assert not any(f"{key}_std" in row for key in constants) and all(key in row for key in constants)


def test_a_spread_that_rounds_to_zero_keeps_three_significant_digits():
    """An α spread of 0.0004 over three seeds read `0.508 ± 0.000`, as if every seed agreed; a spread the format
    shows keeps it (the committed tables: test_docs_values), and an exact 0 stays 0."""
    norms = load_script("compare_norms")
    assert plus_minus({"a": 0.508, "a_std": 0.000412}, "a", ".3f", "—") == "0.508 ± 0.000412"
    assert plus_minus({"a": 0.508, "a_std": 0.0016}, "a", ".3f", "—") == "0.508 ± 0.002"
    assert plus_minus({"a": 0.508, "a_std": 0.0}, "a", ".3f", "—") == "0.508 ± 0.000"
    assert plus_minus({"t": 24908.0, "t_std": 0.25}, "t", ",.0f", "-") == "24,908 ± 0.25"
    row = {"val_loss": 2.7, "val_ppl": 15.0, "alpha_min": 0.508, "alpha_min_std": 0.0004, "alpha_max": 0.6,
           "alpha_max_std": 0.002, "grad_norm_var": 0.02, "nonfinite_steps": 0, "stopped_at": None, "entropy": 2.59,
           "seeds": {"0": {}, "1": {}}}
    assert "| 0.508 ± 0.0004 | 0.600 ± 0.002 |" in norms.markdown({"dyt-pre": {"jax": row}}, ["jax"], 2, "cmd")
