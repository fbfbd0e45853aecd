"""Every JSON the project writes is strict JSON (RFC 8259): a non-finite number (a diverged loss, a kernel's NaN
error) is written as null, never as Python's bare NaN/Infinity words, which jq, JavaScript's
`JSON.parse` and most other parsers refuse, losing the whole report (shared_config.files.json_text)."""

import ast
import json
import math

import numpy as np

from shared_config.files import json_text
from shared_config.report import report_on_stdout, write_report
from shared_config.metrics import append_metrics, read_metrics

from .test_house import MODULES


def strict(text: str):
    """`text` parsed the way a strict parser does: NaN, Infinity and -Infinity are errors."""
    def refuse(word):
        raise AssertionError(f"not JSON: {word}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_null_at_every_depth():
    data = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": np.float64("nan"), "e": "NaN"}, "f": 3}
    assert strict(json_text(data)) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None, "e": "NaN"}, "f": 3}
    assert strict(json_text([0.1, -0.0, 1e308], indent=2)) == [0.1, -0.0, 1e308]  # finite: as json writes them


def test_reports_on_disk_and_on_stdout_are_strict(tmp_path, capsys):
    report = {"results": [{"backend": "jax", "max_rel_err": math.nan, "mfu": math.inf}]}
    write_report(tmp_path / "r.json", report, complete=False)
    (row,) = strict((tmp_path / "r.json").read_text())["results"]
    assert row == {"backend": "jax", "max_rel_err": None, "mfu": None}
    with report_on_stdout("-"):
        write_report("-", report, complete=True)
    assert strict(capsys.readouterr().out)["complete"] is True


def test_a_diverged_runs_metrics_are_strict_and_read_back_as_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, [{"kind": "train", "step": 1, "loss": 2.5, "grad_norm": 0.5},
                          {"kind": "train", "step": 2, "loss": math.nan, "grad_norm": math.inf,
                           "scalars": {"alpha": math.nan}},
                          {"kind": "eval", "step": 2, "val_loss": 800.0, "val_ppl": math.inf}])
    assert [strict(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
    first, diverged, evaluated = read_metrics(path)
    assert first["loss"] == 2.5
    assert all(math.isnan(x) for x in (diverged["loss"], diverged["grad_norm"], diverged["scalars"]["alpha"]))
    assert math.isnan(evaluated["val_ppl"]) and evaluated["kind"] == "eval"


def test_every_json_writer_goes_through_json_text():
    """The kind, not one file: a `json.dumps`/`json.dump` elsewhere in the source writes NaN again. Allowed: json_text
    itself, the spec's canonical JSON (every float in a spec is checked finite when it is built) and the safetensors
    header (integers and strings, in the format's compact separators)."""
    allowed = {"shared_config.files", "shared_config.spec", "shared_config.formats.safetensors"}
    calls = [f"{name}:{node.lineno}" for name, path in MODULES.items() if name not in allowed
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ("dumps", "dump") and getattr(node.func.value, "id", None) == "json"]
    assert not calls, f"json.dumps outside files.json_text: {calls}"
