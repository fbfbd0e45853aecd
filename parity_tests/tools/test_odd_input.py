"""The bench and study command lines against odd input (docs/bench.md, docs/norm-study.md, docs/routing.md): an empty
name, a number past what a step counter holds, a report of the wrong shape, two studies on one --out. Each is
refused in one `error:` line (exit 2) before any work, leaving nothing behind. In-process: main() under cli.run."""

from __future__ import annotations

import pytest

from shared_config.cli import run

from ..support.common import load_script


def error_line(main, argv: list, capsys, *fragments: str) -> str:
    """Run `main(argv)` as the command line does; assert the usage-error contract (exit 2, stdout empty, one
    `error:` line on stderr holding every fragment) and return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and out == "", (exit_.value.code, out, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def bench_main(name: str):
    from importlib import import_module

    return import_module(f"bench.{name}").main


@pytest.mark.parametrize("tool,argv,flag", [
    # a truthiness test read '' as "not given": the defaults ran, or the kernels instead of the compile step
    ("bench.compare", ["--train-config", ""], "--train-config"),
    ("bench.gla_layer", ["--compile-step", ""], "--compile-step"),
    # a path read '' as ".": the cache's jax/ and inductor/ folders landed in the current directory
    ("bench.compare", ["--compile-cache", ""], "--compile-cache"),
    ("bench.profile_step", ["--compile-cache", ""], "--compile-cache"),
    ("bench.gpu_check", ["--dry-run", "--compile-cache", ""], "--compile-cache"),
    ("scripts.parity_report", ["--spec", ""], "--spec"),  # was "give --spec, --weights or both"
    ("scripts.parity_report", ["--spec", "tiny", "--json", ""], "--json"),  # was "exists and is not a regular file"
    ("scripts.parity_report", ["--spec", "tiny", "--train-steps", "1", "--plot", ""], "--plot"),
    ("scripts.compare_logits", ["--weights", ""], "--weights"),
])
def test_an_empty_name_or_path_is_refused_by_its_option(tool, argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder, name = tool.split(".")
    main = bench_main(name) if folder == "bench" else load_script(name).main
    error_line(main, argv, capsys, f"argument {flag}", "got an empty string")
    assert list(tmp_path.iterdir()) == []
