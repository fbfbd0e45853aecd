"""A stopped bench keeps what it measured: compare.py, profile_step.py and parity_report.py rewrite their JSON
whole after every completed row (job x backend, backend, stage), marked "complete": false until the run ends."""

from __future__ import annotations

import importlib
import json

import pytest

from shared_config.report import write_report

from ..support.common import load_script


class Stop(Exception):
    """The run stopped from outside (a time limit, Ctrl-C), raised at a chosen write."""


def bench_module(name: str):
    return importlib.import_module(f"bench.{name}")  # write_report is patched per test, and restored after it


def stopping_writer(monkeypatch, module, stop_when):
    """Replace `module`'s write_report by the real one that also records each file it wrote (read back from disk)
    and raises Stop right after the first write for which `stop_when(report)` holds."""
    written = []

    def write(path, report, *, complete):
        write_report(path, report, complete=complete)
        written.append(json.loads(open(path).read()))
        if stop_when(written[-1]):
            raise Stop()

    monkeypatch.setattr(module, "write_report", write)
    return written


TINY = ["--spec", "tiny", "--batch", "2", "--seq", "16", "--warmup", "0", "--quiet"]


@pytest.mark.slow  # the quick tier under 5 minutes (5 min 37 s this stop); CI runs the full suite
def test_compare_stopped_after_its_first_row_keeps_that_row(tmp_path, monkeypatch):
    compare = bench_module("compare")
    written = stopping_writer(monkeypatch, compare, lambda report: report["results"])
    out = tmp_path / "r.json"
    with pytest.raises(Stop):
        compare.main([*TINY, "--backend", "both", "--steps", "4", "--rounds", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report == written[-1] and report["complete"] is False
    # both jobs compiled first (each written as it finished), then round 1 timed jax: one row of its steps so far
    assert [[c["backend"] for c in w["compiled"]] for w in written] == [["jax"], ["jax", "torch"], ["torch"]]
    (row,) = report["results"]
    assert row["backend"] == "jax" and row["n_steps"] == 2 and row["step_s"]["median"] > 0 and row["compile_s"] > 0
    assert {"device", "versions"} <= set(report["env"])


def test_compare_rewrites_every_row_and_marks_the_end(tmp_path, monkeypatch):
    compare = bench_module("compare")
    written = stopping_writer(monkeypatch, compare, lambda report: False)
    out = tmp_path / "r.json"
    compare.main([*TINY, "--backend", "jax", "--steps", "3", "--rounds", "3", "--json", str(out)])
    assert [w["complete"] for w in written] == [False] * 4 + [True]  # compiled, 3 rounds, the end
    assert [r["n_steps"] for w in written[1:] for r in w["results"]] == [1, 2, 3, 3]
    assert json.loads(out.read_text()) == written[-1] and "compiled" not in written[-1]


@pytest.mark.slow
def test_profile_step_stopped_after_one_backend_keeps_it(tmp_path, monkeypatch):
    profile = bench_module("profile_step")
    written = stopping_writer(monkeypatch, profile, lambda report: True)
    out = tmp_path / "p.json"
    with pytest.raises(Stop):
        profile.main([*TINY, "--backend", "both", "--steps", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and [r["backend"] for r in report["results"]] == ["jax"]
    assert report["results"][0]["categories"] and len(written) == 1


@pytest.mark.slow
def test_parity_report_stopped_in_training_keeps_the_forward_and_gradient_rows(tmp_path, monkeypatch):
    report_script = load_script("parity_report")
    stopping_writer(monkeypatch, report_script, lambda report: True)
    out = tmp_path / "p.json"
    with pytest.raises(Stop):
        report_script.main(["--spec", "tiny", "--seq", "16", "--batch", "1", "--train-steps", "2", "--quiet",
                            "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and "train" not in report
    assert report["passed"] is None  # not yet known: it said true, its training rows still to come
    stages = [r["stage"] for r in report["rows"]]
    assert stages[0] == "model.embed" and "logits" in stages and stages[-1].startswith("grad ")
