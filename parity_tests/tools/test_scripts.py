"""docs/checkpoints.md's first flow: write a preset checkpoint, load it in both twins, see identical logits."""

import json

import pytest

from shared_config import load_checkpoint, load_spec

from ..support.common import one_line_error, run_script


@pytest.mark.slow
def test_init_checkpoint_then_compare_logits(tmp_path):
    path = tmp_path / "tiny-dyt.safetensors"
    r = run_script("init_checkpoint", "--spec", "tiny-dyt", "--seed", "0", "--out", path)
    assert r.returncode == 0 and r.stdout.strip() == str(path), r.stderr
    weights, spec = load_checkpoint(path)
    assert spec == load_spec("tiny-dyt")
    r = run_script("compare_logits", "--weights", path, "--seed", "3")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout is the JSON alone
    assert result["max_abs_diff_over_std"] <= 1e-5 and result["same_argmax"] == 1.0
    assert result["seed"] == 3  # the tokens' seed: two comparisons of one file were told apart by nothing


def test_init_checkpoint_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep me")
    for args, message in [
        (["--spec", "tiny", "--out", path], "exists; pass --force"),
        (["--spec", "tiny", "--set", "n_kv_heads=4", "--out", tmp_path / "x.safetensors"],
         "n_kv_heads=4 must divide n_heads=6"),
        (["--spec", "tinyy", "--out", tmp_path / "x.safetensors"], "no spec preset or file named 'tinyy'"),
        (["--spec", "tiny", "--out", tmp_path / "no" / "x.safetensors"], "is not a directory"),
    ]:
        one_line_error(run_script("init_checkpoint", *args), message)
    assert path.read_bytes() == b"keep me"
    r = run_script("init_checkpoint", "--spec", "tiny", "--out", path, "--force")
    assert r.returncode == 0 and load_checkpoint(path)[1] == load_spec("tiny")
