"""A fresh run never replaces a user's file in its --out: a tokenizer.json there that is not the data's is refused
(the run copies the data's tokenizer to OUT/tokenizer.json). In process, through train.py's own resolve_run."""

from __future__ import annotations

import json
import re

import pytest

from ..support.common import load_script
from .test_run_records import SMALL

TEXT = "".join(f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs\n" for i in range(200))


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """A data directory of byte-level BPE ids with its tokenizer.json (scripts/prepare_data.py)."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "story.txt").write_text(TEXT)
    load_script("prepare_data").main([str(root / "story.txt"), "--out", str(root / "data"), "--tokenizer", "bpe",
                                      "--vocab-size", "300"])
    return root / "data"


def resolve(out, data):
    from shared_config.run import resolve_run

    return resolve_run(load_script("train").parse_args(["--backend", "torch", "--out", str(out), "--data", str(data),
                                                        *SMALL]))


def test_a_users_tokenizer_in_out_is_refused_not_replaced(tmp_path, bpe_data):
    """A --out holding only a tokenizer.json of the user's own (no run record: not an earlier run's) was taken as a
    run directory, and the run copied the data's tokenizer over it without a word."""
    from shared_config.cli import UsageError

    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"mine": true}')
    with pytest.raises(UsageError, match=f"^{re.escape(str(out / 'tokenizer.json'))} is not the data's tokenizer "
                                         f"\\({re.escape(str(bpe_data / 'tokenizer.json'))}\\)"):
        resolve(out, bpe_data)
    assert (out / "tokenizer.json").read_text() == '{"mine": true}'


def test_the_datas_own_tokenizer_in_out_is_no_refusal(tmp_path, bpe_data):
    """The same bytes (a run's copy, or the user's copy of the data's tokenizer) are what the run writes anyway; and
    data without a tokenizer leaves a user's tokenizer.json alone (the run copies nothing there)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((bpe_data / "tokenizer.json").read_bytes())
    assert resolve(out, bpe_data).data.tokenizer == bpe_data / "tokenizer.json"
    (out / "tokenizer.json").write_text('{"mine": true}')
    assert resolve(out, "synthetic").data.tokenizer is None


def test_a_link_to_the_datas_tokenizer_is_kept_and_never_written_through(tmp_path, bpe_data):
    """OUT/tokenizer.json a symbolic link to the data's own tokenizer.json was refused as 'not the data's tokenizer';
    and copy_tokenizer wrote through any link (atomic_write writes a link's target): the data's file rewritten, or on
    a --resume a user's file outside the run directory replaced by the data's tokenizer."""
    from shared_config.run_dir import copy_tokenizer

    data_tokenizer = bpe_data / "tokenizer.json"
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").symlink_to(data_tokenizer)
    assert resolve(out, bpe_data).data.tokenizer == data_tokenizer
    before = data_tokenizer.stat()
    copy_tokenizer(out, data_tokenizer)
    assert (out / "tokenizer.json").is_symlink() and data_tokenizer.stat().st_ino == before.st_ino
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": true}')
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(mine)
    copy_tokenizer(out, data_tokenizer)  # as a --resume does
    assert mine.read_text() == '{"mine": true}' and not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == data_tokenizer.read_bytes()


def test_a_resume_refuses_data_whose_tokenizer_is_not_the_runs(tmp_path, bpe_data):
    """The same token files with another tokenizer.json (or none) were resumed: the new one went into the run and every
    later checkpoint, where generate.py decoded the ids the model learned as other text."""
    import shutil

    from shared_config.data import DataError
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    from .test_study_results import CountingTrainer

    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(bpe_data, data)
    Loop(resolve(out, data), CountingTrainer, progress=False)()
    resume = load_script("train").parse_args(["--backend", "torch", "--out", str(out), "--resume", "--steps", "201"])
    resolve_run(resume)  # the same tokenizer: resumed
    tokenizer = json.loads((data / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # two ids that decode the other way round
    (data / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DataError, match="tokenizer.json: not the tokenizer the run in .* trained with"):
        resolve_run(resume)
    (data / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="data: no tokenizer.json, and the run in .* trained with"):
        resolve_run(resume)
