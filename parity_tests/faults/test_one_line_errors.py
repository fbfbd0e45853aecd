"""Library exceptions become one `error:` line with a documented exit code (docs/checkpoints.md, "Bad input, limits
and failures"): a full disk, dtypes and tensors numpy cannot hold, outputs under a file, --force, bad metrics
lines, out of memory."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import shared_config.formats
from shared_config import CheckpointError, metrics
from shared_config.cli import UsageError, run as cli_run
from shared_config.resources import ResourceError

from ..support.common import (bench_module, load_script, make_spec, one_line, peak_memory, quick_first, run_limited,
                              run_script, safetensors_file)

convert = load_script("convert").convert


@pytest.mark.parametrize("target", quick_first(["o.safetensors", "o.pt", "o-hf", "o-flax"]))
def test_a_full_disk_is_one_line_exit_3_and_leaves_nothing(tmp_path, canonical, target):
    dst = tmp_path / "out"
    dst.mkdir()
    extra = ["--to", target.split("-")[1]] if "-" in target else []
    result = run_limited("convert", canonical, dst / target, *extra, fsize=50_000)
    one_line(result, 3, f"{dst / target}", "cannot write", "RLIMIT_FSIZE")
    assert list(dst.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_in_init_checkpoint_and_train(tmp_path):
    one_line(run_limited("init_checkpoint", "--spec", "tiny", "--out", "x.safetensors", fsize=200_000, cwd=tmp_path),
             3, "x.safetensors: cannot write")
    assert list(tmp_path.iterdir()) == []
    result = run_limited("train", "--backend", "torch", "--out", "run", "--steps", "2", "--quiet", fsize=200_000,
                         cwd=tmp_path)
    one_line(result, 3, "run/step-00000002/model.safetensors: cannot write")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "metrics.jsonl", "run.json"]


def test_a_disk_full_error_from_any_writer_names_the_destination(tmp_path, canonical, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 164672 vs 164560")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ResourceError, match="out.pt: cannot write: .enforce fail"):
        convert(canonical, tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F4"])
def test_dtypes_numpy_cannot_hold_are_refused_by_name(tmp_path, dtype):
    path = safetensors_file(tmp_path / "f8.safetensors", {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}},
                            bytes(2))
    if dtype == "F4":  # 4-bit: two values in a byte, not in the size table
        path = safetensors_file(path, {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 1]}}, bytes(1))
    with pytest.raises(CheckpointError, match=f"tensor 'a': dtype {dtype} is not supported"):
        convert(path, tmp_path / "o.pt", spec="tiny")


@pytest.mark.parametrize("tensor, says", [
    (lambda: torch.zeros(4, 4).to_sparse(), "layout torch.sparse_coo"),
    (lambda: torch.zeros(4, 4).to_sparse_csr(), "layout torch.sparse_csr"),
    (lambda: torch.zeros(4, 4).to(torch.float8_e4m3fn), "dtype torch.float8_e4m3fn"),
    (lambda: torch.quantize_per_tensor(torch.zeros(4, 4), 0.1, 0, torch.qint8), "quantized"),
], ids=["sparse-coo", "sparse-csr", "float8", "quantized"])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta", "ignore:torch.quantize_per_tensor",
                            "ignore:TypedStorage is deprecated")  # torch's notes on the odd tensors made on purpose
def test_tensors_numpy_cannot_hold_in_a_pt_file_are_refused_by_name(tmp_path, tensor, says):
    pt = tmp_path / "odd.pt"
    torch.save({"model.norm.weight": tensor()}, pt)
    with pytest.raises(CheckpointError,
                       match=f"only dense tensors of numpy dtypes are read; not model.norm.weight .{says}"):
        convert(pt, tmp_path / "o.safetensors", spec="tiny")


def test_a_pt_file_whose_views_repeat_a_small_storage_is_refused_before_copying(tmp_path):
    """A 4 KB .pt of stride-0 views (`torch.zeros(1).expand(...)`) matching a spec of d_model 20,004 passed every check
    and was copied tensor by tensor to 4.3 GB (a MemoryError under a limit, the machine's memory without one)."""
    import jax_model
    import torch_model
    from shared_config import model_layout

    spec = make_spec(d_model=20_004, n_layers=1, fused_qkv=False)
    pt = tmp_path / "views.pt"
    torch.save({"spec": spec.to_json(), "state_dict": {t.name: torch.zeros(1).expand(*t.shape)
                                                       for t in model_layout(spec)}}, pt)
    assert pt.stat().st_size < 10_000
    for read in (shared_config.formats.read_checkpoint, jax_model.from_pretrained, torch_model.from_pretrained):
        with pytest.raises(CheckpointError, match=r"views.pt: its tensors hold \d,\d{3},\d{3},\d{3} bytes but the "
                                                  r"file stores 48: views that repeat stored data .*embed_tokens"):
            read(pt)
    shared = tmp_path / "shared.pt"  # two names for one storage: each within it, together twice its bytes
    w = torch.zeros(4, 4)
    torch.save({"model.norm.weight": w, "lm_head.weight": w}, shared)
    with pytest.raises(CheckpointError,
                       match="shared.pt: its tensors hold 128 bytes but the file stores 64: .*sharing a storage"):
        shared_config.formats.read_checkpoint(shared, spec="tiny")


def test_a_compressed_pt_file_is_refused_before_it_is_unpacked(tmp_path):
    """torch.load inflates deflated zip members: a 200 KB file held a 200 MB tensor (any ratio up to ~1000)."""
    import zipfile

    plain, packed = tmp_path / "plain.pt", tmp_path / "packed.pt"
    torch.save({"model.norm.weight": torch.zeros(250_000)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert packed.stat().st_size < plain.stat().st_size / 50
    with pytest.raises(CheckpointError, match=r"packed.pt: its zip members unpack to 1,000,\d+ bytes, more than the "
                                              r"file's \d+,\d+; torch.save stores them uncompressed"):
        shared_config.formats.read_checkpoint(packed, spec="tiny")


def test_train_out_naming_a_file_or_a_path_under_one(tmp_path):
    (tmp_path / "afile").write_text("keep")
    one_line(run_script("train", "--backend", "torch", "--out", tmp_path / "afile", "--quiet"), 2,
             "--out", "afile is a file, not a directory")
    one_line(run_script("train", "--backend", "torch", "--out", tmp_path / "afile" / "run", "--quiet"), 2,
             "--out", "afile/run", "afile is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "keep"


def test_prepare_data_input_that_is_a_directory_or_a_fifo(tmp_path):
    one_line(run_script("prepare_data", tmp_path, "--out", tmp_path / "data"), 2, f"{tmp_path}: a directory")
    assert list(tmp_path.iterdir()) == []
    os.mkfifo(tmp_path / "fifo")  # and /dev/zero: they were "no such file"
    one_line(run_script("prepare_data", tmp_path / "fifo", "--out", tmp_path / "data"), 2,
             f"{tmp_path / 'fifo'}: not a regular file (a FIFO or a device); give a text file")


def test_prepare_data_out_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "text.txt").write_text("some text to tokenize " * 20)
    one_line(run_script("prepare_data", tmp_path / "text.txt", "--out", tmp_path / "afile" / "data"), 2,
             "--out", "afile/data", "afile is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "text.txt"]


@pytest.mark.parametrize("args, says", [
    (["--tokenizer", "bpe", "--vocab-size", "99999999999"], ["--vocab-size 99999999999", "> 256", "<= 2**32"]),
    (["--tokenizer", "bpe", "--vocab-size", "256"], ["--vocab-size 256", "> 256", "<= 2**32"]),
    (["--val-fraction", "0.99999"], ["--val-fraction 0.99999", "440 tokens into 1 train and 439 validation"]),
    (["--val-fraction", "0.001"], ["--val-fraction 0.001", "440 tokens into 440 train and 0 validation"]),
    (["--vocab-size", "1000"], ["--vocab-size 1000: the BPE's vocabulary", "--tokenizer byte has 256"]),  # ignored
], ids=["vocab-too-large", "vocab-too-small", "train-split-too-short", "val-split-too-short", "vocab-with-bytes"])
def test_prepare_data_refuses_what_train_cannot_use(tmp_path, args, says):
    (tmp_path / "text.txt").write_text("some text to tokenize " * 20)
    one_line(run_script("prepare_data", tmp_path / "text.txt", "--out", tmp_path / "new" / "data", *args), 2, *says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]  # not even --out's parent


@pytest.mark.parametrize("dst, to, ends", [("o.pt", "safetensors", ".safetensors"),
                                          ("o.safetensors", "torch", ".pt or .pth"), ("o", "torch", ".pt or .pth"),
                                          ("o.bin", "safetensors", ".safetensors")])
def test_convert_refuses_a_file_name_its_readers_would_misread(tmp_path, canonical, dst, to, ends):
    """--to torch into o.safetensors wrote a pickle every reader refused as a safetensors header 10^17 bytes long."""
    with pytest.raises(UsageError, match=f"a {to} checkpoint is a file whose name ends in {ends}"):
        convert(canonical, tmp_path / dst, to=to)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_force_replaces_only_what_the_script_wrote(tmp_path, canonical):
    """--force on a directory prepare_data.py / convert.py did not write (no meta.json / no config.json or state/)
    is one line, exit 2, and deletes nothing; their own output is still replaced."""
    (tmp_path / "text.txt").write_text("some text to tokenize " * 20)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "canary.txt").write_text("keep me")
    one_line(run_script("prepare_data", tmp_path / "text.txt", "--out", mine, "--force"), 2,
             f"--out {mine}: holds files but no meta.json")
    one_line(run_script("convert", canonical, mine, "--to", "hf", "--force"), 2,
             f"{mine}: --force replaces only a checkpoint directory convert.py writes")
    assert [p.name for p in mine.iterdir()] == ["canary.txt"] and (mine / "canary.txt").read_text() == "keep me"
    data = tmp_path / "data"
    for _ in range(2):  # the second run replaces the first's output
        assert run_script("prepare_data", tmp_path / "text.txt", "--out", data, "--force").returncode == 0
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def _own_meta(data):
    return json.loads((data / "meta.json").read_text())


@pytest.mark.parametrize("change, says", [
    (lambda d: (d / "meta.json").write_text("{}"), "its meta.json is not this script's (keys vocab_size, "),
    (lambda d: (d / "notes.txt").write_text("keep"), "holds 'notes.txt', which prepare_data.py does not write"),
    (lambda d: (d / "meta.json").write_text("[1"), "its meta.json cannot be read (not valid JSON"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**_own_meta(d), "train_tokens": 7})),
     "its meta.json does not describe train.bin (train_tokens 7 of uint16)"),
    (lambda d: (d / "val.bin").write_bytes(b"\0" * 10), "its meta.json does not describe val.bin (val_tokens "),
    (lambda d: (d / "meta.json").write_text(json.dumps({**_own_meta(d), "tokenizer": "bpe"})),
     "its meta.json says tokenizer bpe, but there is no tokenizer.json"),
    (lambda d: (d / "train.bin").unlink() or (d / "train.bin").symlink_to(d / "val.bin"),
     "its train.bin is not a regular file"),
], ids=["empty-meta", "foreign-file", "bad-json", "other-count", "other-file", "no-tokenizer", "link"])
def test_force_trusts_only_a_meta_json_that_describes_its_own_files(tmp_path, change, says):
    """--force deleted any directory holding a meta.json: `{}` beside a user's notes, or a meta.json that no longer
    described the files beside it. It now replaces only what prepare_data.py writes: its files alone, described by its
    meta.json (keys, dtype, token counts, tokenizer); anything else is one line and nothing is deleted."""
    (tmp_path / "text.txt").write_text("some text to tokenize " * 20)
    data, main = tmp_path / "data", load_script("prepare_data").main
    main([str(tmp_path / "text.txt"), "--out", str(data)])
    change(data)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file() and not p.is_symlink()}
    with pytest.raises(UsageError, match=re.escape(f"--out {data}: {says}")):
        main([str(tmp_path / "text.txt"), "--out", str(data), "--force"])
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file() and not p.is_symlink()} == before


def test_force_replaces_its_own_bpe_directory(tmp_path):
    """Its own output, tokenizer.json included, is still what --force replaces."""
    (tmp_path / "text.txt").write_text("some text to tokenize " * 20)
    argv = [str(tmp_path / "text.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "bpe", "--vocab-size", "300"]
    for force in ([], ["--force"]):
        load_script("prepare_data").main(argv + force)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_force_never_deletes_the_input_it_reads(tmp_path, canonical):
    """An input inside the directory --force replaces went with it: `prepare_data.py d/corpus.txt --out d --force`
    lost the corpus, `convert.py d/m.safetensors d --to hf --force` the checkpoint. Refused, nothing touched; a
    directory converted in place (SRC is DST) is still replaced."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    (data / "corpus.txt").write_text("some text to tokenize " * 20)
    with pytest.raises(UsageError, match=f"--out {data} holds INPUT {data / 'corpus.txt'}, which replacing it would "
                                         "delete"):
        load_script("prepare_data").main([str(data / "corpus.txt"), "--out", str(data), "--force"])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    os.replace(canonical, hf / "m.safetensors")
    with pytest.raises(UsageError, match=f"DST {hf} holds SRC {hf / 'm.safetensors'}, which replacing it would"):
        convert(hf / "m.safetensors", hf, to="hf", force=True)
    assert sorted(p.name for p in data.iterdir()) == ["corpus.txt", "meta.json"]
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "m.safetensors"]
    convert(hf / "m.safetensors", tmp_path / "out", to="hf")
    convert(tmp_path / "out", tmp_path / "out", to="hf", force=True)


def test_init_checkpoint_arguments_numpy_would_choke_on(tmp_path):
    (tmp_path / "adir").mkdir()
    one_line(run_script("init_checkpoint", "--spec", "tiny", "--seed", "-1", "--out", tmp_path / "x.safetensors"), 2,
             "--seed must be >= 0, got -1")
    one_line(run_script("init_checkpoint", "--spec", "tiny", "--out", tmp_path / "adir", "--force"), 2,
             "adir is a directory; a checkpoint is a file")
    for name in ("a.pt", "a.txt", "a"):  # safetensors bytes under another name: the loaders would refuse them
        one_line(run_script("init_checkpoint", "--spec", "tiny", "--out", tmp_path / name), 2,
                 f"--out {tmp_path / name}: init_checkpoint.py writes safetensors", "must end in .safetensors",
                 "convert.py makes the other formats")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


@pytest.mark.parametrize("line, says", [("12", "a JSON object is expected, got 12"),
                                        ('{"step": "x"}', "step must be an integer, got 'x'"),
                                        ("not json", "not valid JSON .and not the last line")])
def test_metrics_lines_that_are_not_records_are_named(tmp_path, line, says):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n{line}\n{{"step": 2}}\n')
    with pytest.raises(CheckpointError, match=f"metrics.jsonl: line 2: {says}"):
        metrics.truncate_metrics(path, 1)
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a last line cut by a crash: skipped
    assert metrics.read_metrics(path) == [{"step": 1}]


def test_a_metrics_line_past_the_limit_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    """Iterating the file read a line whole before checking its length: a file without newlines, all of it."""
    monkeypatch.setattr(metrics, "MAX_JSON_BYTES", 2**20)
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n' + b"x" * (16 * 2**20))
    raised, peak = peak_memory(lambda: metrics.read_metrics(path))
    assert isinstance(raised, CheckpointError) and "line 2 is over the 1,048,576-byte limit" in str(raised), raised
    assert peak < 4 * 2**20, peak


def test_out_of_memory_in_the_bench_names_the_job_and_what_to_lower(monkeypatch, capsys):
    compare, timing = bench_module("compare"), bench_module("timing")

    def oom(args, specs, backends, kernels, train_config, on_progress=None, during=None):
        args.job = "torch train job of small"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(timing, "run_benchmarks", oom)
    monkeypatch.setattr(compare, "configure_threads", lambda *a: None)
    with pytest.raises(SystemExit) as e:
        cli_run(compare.main, ["--backend", "torch", "--batch", "2", "--seq", "8"])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert (err == ["error: the torch train job of small ran out of memory at batch 2 x seq 8: lower --batch-size "
                    "or --seq-len"])


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB")])
def test_any_out_of_memory_is_one_line_exit_3(capsys, error):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as e:
        cli_run(main, [])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory")
