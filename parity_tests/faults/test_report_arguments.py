"""Reports and plots at their edges (bench's --json and --plot, plot_context.py, replot.py; docs/bench.md): every
file in the format its name says, a JSON that is not a comparable decode report named, `--json -` alone on stdout.
In-process."""

from __future__ import annotations

import json
import re

import pytest

from shared_config.cli import UsageError, check_outputs


def decode_report(**env) -> dict:
    row = {"variant": "tiny", "backend": "jax", "step_s": {"median": 1e-3, "p10": 9e-4, "p90": 2e-3}, "mfu": None}
    return {"env": {"mode": "decode", "seq": 16, "device": "cpu", "dtype": "float32", "batch": 2, "spec": "tiny",
                    "set": [], **env},
            "results": [row]}


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".PNG", b"\x89PNG"), (".pdf", b"%PDF"),
                                           (".svg", b"<?xml")])
def test_every_plot_is_written_in_the_format_its_name_says(tmp_path, suffix, magic):
    """compare.py --plot x.svg and plot_context.py --out x.pdf wrote PNG bytes under those names."""
    from bench import plot, plot_context

    plot.plot_results({**decode_report(), "results": decode_report()["results"]}, tmp_path / f"bars{suffix}")
    report = tmp_path / "decode.json"
    report.write_text(json.dumps(decode_report()))
    plot_context.main([str(report), "--out", str(tmp_path / f"ctx{suffix}")])
    assert {p.name: p.read_bytes()[:len(magic)] for p in tmp_path.glob(f"*{suffix}")} == {
        f"bars{suffix}": magic, f"ctx{suffix}": magic}


def test_a_plots_title_names_the_set_its_labels_leave_out(tmp_path, monkeypatch):
    """Without a sweep every variant is labelled by --spec: `--set n_layers=1`'s bars read "tiny" with nothing
    else saying the spec was changed. The plot's title says it, as the table's does (bench.plot.report_title)."""
    from bench import plot

    titles = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, path, dpi: titles.append(fig._suptitle.get_text()))
    plot.plot_results(decode_report(set=["n_layers=1", "d_model=48"]), tmp_path / "bars.png")
    assert titles == ["cpu | decode | float32 | batch 2 x seq 16 | --set n_layers=1 d_model=48"]


def test_replot_redraws_a_reports_bars_and_refuses_what_is_not_one(tmp_path, capsys):
    """Nothing redrew a report: `python bench/plot.py r.json --out x.png` (a library) exited 0 and drew nothing.
    bench/replot.py reads the report as plot_context.py does (and an MFU that is no fraction)."""
    from bench import replot

    report = tmp_path / "r.json"
    report.write_text(json.dumps(decode_report()))
    replot.main([str(report), "--out", str(tmp_path / "bars.png")])
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.strip().endswith("bars.png")
    report.write_text(json.dumps({**decode_report(), "results": [{**decode_report()["results"][0], "mfu": "high"}]}))
    with pytest.raises(UsageError, match=r"results\[0\]\.mfu must be null or a number in \[0, 1e\+06\]"):
        replot.main([str(report), "--out", str(tmp_path / "other.png")])
    assert not (tmp_path / "other.png").exists()


TRAIN_ENV = {"mode": "train", "grad_accum_steps": 1, "remat": "none", "loss_chunk": 0}


@pytest.mark.parametrize("env, results, says", [
    # the memory options the title names: a KeyError (or a None printed as a setting) once past the checks
    ({**TRAIN_ENV, "grad_accum_steps": None}, None, "env.grad_accum_steps is not an integer"),
    ({k: v for k, v in TRAIN_ENV.items() if k != "loss_chunk"}, None, "env.loss_chunk is not an integer"),
    ({**TRAIN_ENV, "remat": None}, None, "env.remat is not a string"),
    # --set's items, joined into the title: a TypeError traceback; a string was spelt out a letter at a time
    ({"set": [1, 2]}, None, "env.set is not a list of strings"),
    ({"set": "n_layers=1"}, None, "env.set is not a list of strings"),
    # two rows of one (variant, backend): one drawn over the other, a bar for two timings
    ({}, [decode_report()["results"][0]] * 2, "results[1] repeats variant 'tiny' of backend 'jax'"),
], ids=["accum-null", "no-loss-chunk", "remat-null", "set-ints", "set-string", "repeated-row"])
def test_replot_names_a_title_field_or_row_that_is_not_a_reports(tmp_path, env, results, says):
    """replot.py on a report whose fields the title reads are missing or of another type: a traceback (KeyError,
    TypeError) after the report was read as valid; a report with a row twice drew one bar for it."""
    from bench import replot

    report = decode_report(**env)
    (tmp_path / "r.json").write_text(json.dumps({**report, "results": results or report["results"]}))
    with pytest.raises(UsageError, match=re.escape(says)):
        replot.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "bars.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_json_and_plot_naming_one_file_is_refused(tmp_path):
    """compare.py --json x.png --plot x.png: the image replaced the report at the end of the run."""
    with pytest.raises(UsageError, match="--json and --plot name the same file"):
        check_outputs(tmp_path / "x.png", tmp_path / "." / "x.png")


@pytest.mark.parametrize("report, says", [
    ({}, "not a bench/compare.py --json report: no env object"),  # KeyError: 'env'
    ({"env": {"mode": "decode", "seq": "16"}, "results": []}, "env.seq is not an integer"),
    ({**decode_report(), "results": [{"variant": "tiny"}]}, "results[0] lacks variant, backend or step_s"),
    (decode_report(mode="train"), "r.json: a train report: pass decode reports"),
    # the title's fields: a KeyError traceback after the report was read
    ({**decode_report(), "env": {"mode": "decode", "seq": 16}}, "env.device is not a string"),
    (decode_report(batch=None), "env.batch is not an integer"),
    # a run stopped before its first round: an empty plot, exit 0
    ({**decode_report(), "results": [], "complete": False}, "r.json: no timed rows to plot"),
    # numbers no step takes: 1e308 was matplotlib's traceback; NaN, < 0, 0, true and a band below its median drew
    *[({**decode_report(), "results": [{**decode_report()["results"][0], "step_s": times}]},
       "results[0].step_s must") for times in ({"median": 1e308, "p10": 1e-3, "p90": 1e308},
                                               {"median": float("nan"), "p10": 1e-3, "p90": 1e-3},
                                               {"median": -1.0, "p10": -2.0, "p90": 1.0},
                                               {"median": True, "p10": True, "p90": True},
                                               {"median": 1e-3, "p10": 2e-3, "p90": 3e-3})],
    (decode_report(seq=0), "env.seq is not >= 1"),
    ({**decode_report(), "results": [{**decode_report()["results"][0], "variant": str(i)} for i in range(65)]},
     "the reports hold 65 (variant, backend) lines; one plot draws at most 64"),  # 20,000 drew for minutes
], ids=["empty", "seq-string", "row-without-times", "train", "no-device", "no-batch", "no-rows", "huge", "nan",
        "negative", "true", "band", "seq-0", "lines"])
def test_plot_context_names_a_json_that_is_not_a_decode_report(tmp_path, report, says):
    from bench import plot_context

    (tmp_path / "r.json").write_text(json.dumps(report))
    with pytest.raises(UsageError, match=re.escape(says)):
        plot_context.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "ctx.png")])
    with pytest.raises(UsageError, match="--out .*ctx.txt: the file must end in .png, .pdf, .svg"):
        plot_context.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "ctx.txt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_plot_context_draws_one_curve_per_job_from_comparable_reports(tmp_path, capsys):
    """Reports of one device, dtype, batch, spec and --set (any order, max_seq_len aside), one per prompt length: a
    report given twice, a prompt length in two reports (the line went back and forth), another batch (its points
    joined the first file's curves, titled with the first file's batch) or another --set (another model under the
    variant label "tiny") is refused; a stopped run's report is drawn, named on stderr."""
    from bench import plot_context

    def report(name, **env):
        (tmp_path / name).write_text(json.dumps({**decode_report(**env), "complete": name != "stopped.json"}))
        return str(tmp_path / name)

    a, b, again, other = report("a.json"), report("stopped.json", seq=32), report("c.json"), report("d.json", batch=4)
    # another model under the same label (a variant is labelled by its --sweep values, else --spec): joined as one curve
    smaller = report("e.json", seq=32, set=["n_layers=1", "d_model=48"])
    out = str(tmp_path / "ctx.png")
    for reports, says in [([a, a], "is given twice"), ([a, again], "tiny jax at --seq-len 16 is in two reports"),
                          ([a, other], "d.json has batch 4 and " + a + " batch 2: pass reports of one device"),
                          ([a, smaller], "e.json has set ['n_layers=1', 'd_model=48'] and " + a + " set []: pass")]:
        with pytest.raises(UsageError, match=re.escape(says)):
            plot_context.main([*reports, "--out", out])
    assert not (tmp_path / "ctx.png").exists()
    capsys.readouterr()
    # one model: --set in another order, and another max_seq_len (each report raises it to fit its prompt)
    plot_context.main([smaller, report("f.json", seq=64, set=["max_seq_len=4200", "d_model=48", "n_layers=1"]),
                       "--out", out])
    assert "seq 32: 1.00 ms  seq 64: 1.00 ms" in capsys.readouterr().out
    plot_context.main([a, b, "--out", out])
    captured = capsys.readouterr()
    assert "seq 16: 1.00 ms  seq 32: 1.00 ms" in captured.out and (tmp_path / "ctx.png").stat().st_size > 0
    assert captured.err.strip() == (f'warning: {b} is a stopped run\'s report ("complete": false): its rows are over '
                                    "the steps it had (n_steps)")


def test_json_dash_puts_the_report_alone_on_stdout(tmp_path, monkeypatch, capsys):
    """`--json -` wrote a file named "-" into the working directory, and the table went to stdout."""
    from bench import gla_layer

    monkeypatch.chdir(tmp_path)
    gla_layer.main(["--backend", "torch", "--tokens", "16", "--heads", "1", "--key", "8", "--value", "8",
                    "--repeats", "1", "--json", "-"])
    out, err = capsys.readouterr()
    report = json.loads(out)  # the whole of stdout is one JSON document: the finished report
    assert report["complete"] is True and [r["kernel"] for r in report["results"]] == ["pure"]
    assert "| torch | pure |" in err and list(tmp_path.iterdir()) == []


def test_write_report_to_dash_writes_once_when_complete(capsys):
    from shared_config.report import report_on_stdout, write_report

    with report_on_stdout("-"):
        print("a table for people")
        write_report("-", {"rows": [1]}, complete=False)  # a partial report: a file keeps it; stdout would repeat
        write_report("-", {"rows": [1, 2]}, complete=True)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"rows": [1, 2], "complete": True} and err == "a table for people\n"
