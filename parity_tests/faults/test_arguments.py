"""Command-line arguments at their edges (docs/checkpoints.md, "Bad input, limits and failures"): text that is not
UTF-8, numbers out of range, option syntax with stray spaces, options that would be ignored or silently override each
other. Each is one `error:` line naming the option, before any work; in-process where the CLI's own parsing is not the
question. The bench's own options: test_bench_arguments.py; reports and plots: test_report_arguments.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from shared_config import SpecError, save_checkpoint
from shared_config.cli import UsageError, printable, utf8_argument
from shared_config.resources import ResourceError
from shared_config.study import study_args, study_parser

from ..support.common import ROOT, checkout_env, load_script, make_spec, parity_weights

generate = load_script("generate")
compare_logits = load_script("compare_logits")
NOT_UTF8 = b"ab\xff\xfe".decode("utf-8", "surrogateescape")  # how Python hands argv bytes that are not UTF-8


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    spec = make_spec(vocab_size=300)
    path = tmp_path_factory.mktemp("args") / "model.safetensors"
    save_checkpoint(path, parity_weights(spec), spec)
    return path


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_byte(weights):
    with pytest.raises(UsageError, match=r"--prompt: byte 0xff at character 2 is not UTF-8"):
        generate.main(["--backend", "torch", "--weights", str(weights), "--prompt", NOT_UTF8])
    assert utf8_argument("--prompt", "héllo") == "héllo"


def test_a_study_records_an_argument_that_is_not_utf8_as_printable_text(tmp_path):
    """The study's table holds its command line; a lone surrogate failed that write after the whole study."""
    argv = ["--out", str(tmp_path / NOT_UTF8)]
    args = study_args(study_parser("A study.", 1, ["a"], "configs", "out", "where").parse_args(argv), "x.py", argv)
    assert args.command.endswith("ab\\xff\\xfe") and args.command.encode("utf-8")
    assert printable("plain é") == "plain é"


@pytest.mark.parametrize("args, says", [
    (["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),  # ZeroDivisionError in numpy
    (["--batch", "-1"], "argument --batch: must be an integer >= 1, got -1"),  # negative dimensions
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),  # expected non-negative integer
    (["--seq", "0"], "argument --seq: must be an integer >= 1, got 0"),
])
def test_compare_logits_bounds_its_numbers_at_parse_time(args, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare_logits.main(["--spec", "tiny", *args])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"error: {says}"


def test_compare_logits_refuses_a_job_past_memory_before_drawing(monkeypatch):
    monkeypatch.setattr(compare_logits, "init_weights", lambda *a: pytest.fail("drew the weights"))
    with pytest.raises(ResourceError, match="comparing 3 layers .* batch 100,000,000 x seq 256 .* lower --batch"):
        compare_logits.main(["--spec", "tiny", "--batch", "100000000", "--seq", "256"])


def test_compare_logits_measures_one_logit_on_its_size_not_its_std(tmp_path, capsys):
    """A vocabulary of 1 at --batch 1 --seq 1 is one logit, std 0: the ratio was a NumPy divide-by-zero warning on
    stderr and null; it is on max|logit| instead, as the parity report measures."""
    spec = make_spec(vocab_size=1)
    save_checkpoint(tmp_path / "one.safetensors", parity_weights(spec), spec)
    compare_logits.main(["--weights", str(tmp_path / "one.safetensors"), "--batch", "1", "--seq", "1"])
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["logits_std"] == 0.0
    assert 0 <= json.loads(out)["max_abs_diff_over_std"] < 1e-5


def test_compare_logits_claims_no_agreement_of_nan_logits(tmp_path, capsys):
    """Weights past float32's reach (finite, 1e18 times tiny's) make NaN logits in both twins: the diffs were null, and
    same_argmax 1.0, the first NaN's index taken as each twin's choice."""
    spec = make_spec(n_layers=1)
    weights = {name: (w * np.float32(1e18)).astype(w.dtype) for name, w in parity_weights(spec).items()}
    save_checkpoint(tmp_path / "huge.safetensors", weights, spec)
    compare_logits.main(["--weights", str(tmp_path / "huge.safetensors"), "--batch", "1", "--seq", "4"])
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] is None and result["same_argmax"] is None
    from shared_config.parity import top1_agreement  # parity_report.py's bf16 row: a PASS amid the FAILs

    assert np.isnan(top1_agreement(np.full((1, 2, 3), np.nan), np.full((1, 2, 3), np.nan)))
    assert top1_agreement(np.eye(3)[None], np.eye(3)[None]) == 1.0


@pytest.mark.parametrize("text", ["1_0", "１", "1,,2", "1,", "0x10", "1e3", "-0", "+1", "1,-3", "- 1"])
def test_token_ids_are_ascii_integers(text):
    """int() alone read '1_0' as 10 (a typo for 1,0) and '１' (full-width) as 1; '-0' was read as 0 where '+1' was
    refused: an id is digits 0-9 alone, either sign refused alike."""
    with pytest.raises(UsageError, match="--tokens .* must be comma-separated integer ids, digits 0-9 without a sign"):
        generate.parse_tokens(text)
    assert generate.parse_tokens(" 1, 2,03") == [1, 2, 3]  # spaces and leading zeros: the digits' value


@pytest.mark.parametrize("mesh, says", [("data=²", "'data=²' must be axis=N with N >= 1"),  # int('²'): a traceback
                                        ("data=2,data=4", "axis 'data' given twice")])  # the last kept silently
def test_a_mesh_takes_ascii_sizes_and_each_axis_once(mesh, says):
    from shared_config.parallel import parse_mesh

    with pytest.raises(SpecError, match=re.escape(says)):
        parse_mesh(mesh)
    assert parse_mesh(" data = 2 , fsdp=4") == {"data": 2, "fsdp": 4}


def test_a_run_directory_given_as_weights_names_its_latest_checkpoint(tmp_path, weights):
    """--weights runs/tiny said only "neither a Hugging Face directory ... nor a run's checkpoint"."""
    from shared_config import CheckpointError
    from shared_config.formats import read_checkpoint

    for step in ("step-00000100", "step-00000200"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "model.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="a training run's directory, .* e.g. the latest: .*step-00000200$"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("out", ["file", "file/x"])
def test_a_study_names_an_out_under_a_file_before_any_run(tmp_path, out):
    """It was "FILE: File exists" (or "Not a directory") from the first mkdir, naming no option."""
    (tmp_path / "file").write_text("not a directory")
    argv = ["--out", str(tmp_path / out)]
    with pytest.raises(UsageError, match=f"--out .*{out}: .*file is a file, not a directory"):
        study_args(study_parser("A study.", 1, ["a"], "c", "out", "w").parse_args(argv), "x.py", argv)


def test_generate_refuses_an_attention_kernel_for_a_model_without_attention(tmp_path):
    spec = make_spec(mixer="gla", position="none", n_kv_heads=None)
    save_checkpoint(tmp_path / "gla.safetensors", parity_weights(spec), spec)
    with pytest.raises(UsageError, match="--attention einsum: this model's layers are mixer=gla"):
        generate.main(["--backend", "torch", "--weights", str(tmp_path / "gla.safetensors"), "--tokens", "1",
                       "--attention", "einsum"])
    hybrid = spec.replace(gla_attention_every=2)  # a hybrid stack's attention layer takes the kernel
    save_checkpoint(tmp_path / "hybrid.safetensors", parity_weights(hybrid), hybrid)
    assert generate.main(["--backend", "torch", "--weights", str(tmp_path / "hybrid.safetensors"), "--tokens", "1",
                          "--attention", "einsum", "--max-new-tokens", "2"]) in (0, None)


@pytest.mark.parametrize("args", [["--top-p", "0.5"], ["--top-k", "3"], ["--seed", "5", "--temperature", "0"]])
def test_generate_refuses_sampling_options_greedy_decoding_ignores(weights, args):
    """--top-p 0.5 without --temperature decoded greedily: the option did nothing, without a word."""
    flag = args[0]
    with pytest.raises(UsageError, match=f"{flag} shapes sampling, and decoding is greedy"):
        generate.main(["--backend", "torch", "--weights", str(weights), "--tokens", "1", *args])


def test_parity_report_refuses_a_train_config_it_would_not_read():
    """--train-config without --train-steps compared untrained models, the config never read."""
    report = load_script("parity_report")
    with pytest.raises(UsageError, match="--train-config needs --train-steps N"):
        report.parse_args(["--spec", "tiny", "--train-config", "parity"])
    assert report.parse_args(["--spec", "tiny", "--train-steps", "1"]).train_config is None  # the parity preset


def test_prepare_data_holds_about_4_bytes_a_token_while_encoding(tmp_path, monkeypatch):
    """The whole file's ids were Python lists first: about 36 bytes a token, 9 GB for a 1 GB corpus."""
    import tracemalloc

    prepare = load_script("prepare_data")
    monkeypatch.setattr(prepare, "LINES_PER_CHUNK", 500)  # many chunks, as in a real corpus
    text = tmp_path / "in.txt"
    text.write_text("".join(f"line {i} of a story, once upon a time\n" for i in range(20_000)))
    tokenizer = prepare.train_bpe(text, 300)
    tracemalloc.start()
    try:
        tokens = prepare.bpe_tokens(tokenizer, text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens.dtype == "uint32" and len(tokens) > 100_000
    # ~8 bytes a token measured (the array and one concatenated copy, plus a chunk); the lists cost ~36. The margin
    # holds what other threads of a busy test worker allocate meanwhile (tracemalloc counts them too): at 12 a token
    # the test failed once under -n 2
    assert peak < 16 * len(tokens), peak / len(tokens)


def test_prepare_data_writes_byte_tokens_without_holding_the_file(tmp_path, monkeypatch):
    """Byte-level: the file was read whole and widened to uint16, twice (about 5 bytes a byte, a corpus of a fifth of
    the machine's memory took it all); now memory-mapped and written a chunk at a time."""
    from ..support.common import peak_memory

    prepare = load_script("prepare_data")
    monkeypatch.setattr(prepare, "TOKENS_PER_WRITE", 1 << 16, raising=False)
    text = tmp_path / "in.txt"
    text.write_bytes(bytes(range(256)) * 16_384)  # 4 MiB
    raised, peak = peak_memory(lambda: prepare.main([str(text), "--out", str(tmp_path / "data")]))
    assert raised is None and peak < (1 << 20), peak  # a chunk and its widened copy, not the file
    assert (tmp_path / "data" / "train.bin").read_bytes() == np.frombuffer(text.read_bytes(), np.uint8)[
        : len(text.read_bytes()) - int(len(text.read_bytes()) * 0.1)].astype(np.uint16).tobytes()


def test_a_path_that_is_not_utf8_prints_as_its_bytes_on_a_strict_stdout(monkeypatch):
    """init_checkpoint.py and convert.py print the path they wrote: a strict stdout (a UTF-8 locale other than
    C.UTF-8) raised UnicodeEncodeError there, a traceback after the work was done."""
    import io
    import sys

    from shared_config.cli import run as cli_run

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
    with pytest.raises(SystemExit) as exit_:
        cli_run(lambda argv: print(f"/tmp/{NOT_UTF8}.safetensors"), [])
    sys.stdout.flush()
    assert exit_.value.code == 0 and raw.getvalue() == b"/tmp/ab\xff\xfe.safetensors\n"


# What a tool loads only once its work needs it: a framework, matplotlib, and ml_dtypes (0.8 s at import, which was
# most of every tool's start-up before an `error:` line or `--help`, and the time a Ctrl-C got a traceback in).
LOADED_FOR_WORK = ("torch", "jax", "flax", "orbax", "transformers", "matplotlib", "triton", "ml_dtypes")


def tools_in_one_process(runs: list[tuple[str, list[str]]]) -> list[tuple[int | str | None, str, str, list[str]]]:
    """Each (tool path, argv) run as its command line (runpy, `__main__`), one after another in one fresh process:
    its exit code, stdout, stderr and which of LOADED_FOR_WORK the process had imported by then."""
    code = ("import contextlib, io, json, runpy, sys\n"
            f"for path, argv in {runs!r}:\n"
            "    sys.argv, out, err, code = [path, *argv], io.StringIO(), io.StringIO(), 0\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "        try:\n"
            "            runpy.run_path(path, run_name='__main__')\n"
            "        except SystemExit as e:\n"
            "            code = e.code\n"
            f"    loaded = sorted(m for m in {LOADED_FOR_WORK!r} if m in sys.modules)\n"
            "    print(json.dumps([code, out.getvalue(), err.getvalue(), loaded]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=checkout_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(json.loads(line)) for line in result.stdout.splitlines()]


@pytest.mark.slow
def test_every_tools_help_loads_no_framework():
    """Each tool (a scripts/ or bench/ file with a `__main__`), run with --help in one process one after another:
    its usage is printed with none of LOADED_FOR_WORK imported (the first tool that imports one is named)."""
    tools = sorted(str(p.relative_to(ROOT)) for folder in ("scripts", "bench") for p in (ROOT / folder).glob("*.py")
                   if "__main__" in p.read_text())
    found = tools_in_one_process([(path, ["--help"]) for path in tools])
    assert len(tools) >= 16 and [(path, "usage:" in out, loaded) for path, (_, out, _, loaded) in zip(tools, found)
                                 ] == [(path, True, []) for path in tools]


def test_a_bad_train_option_of_the_bench_is_refused_before_any_framework_loads(tmp_path):
    """compare.py and profile_step.py built their train config (the memory options, --train-config) after importing
    jax and torch: `--loss-chunk -1` took ~3.5 s to say one line. Each tool runs in one process here, one after
    another: the one-line error, exit code 2 and none of LOADED_FOR_WORK imported."""
    config = tmp_path / "bf16.yaml"
    config.write_text("compute_dtype: bfloat16\n")
    cases = [("bench/compare.py", ["--loss-chunk", "-1"], "--loss-chunk -1 must be >= 0"),
             ("bench/compare.py", ["--grad-accum", "3", "--batch", "8"],
              "--grad-accum-steps 3 must be >= 1 and divide --batch-size 8"),
             ("bench/compare.py", ["--train-config", str(config)], "compute_dtype=bfloat16 is the bench's"),
             ("bench/profile_step.py", ["--train-config", str(config)], "compute_dtype=bfloat16 is the bench's")]
    found = tools_in_one_process([(path, argv) for path, argv, _ in cases])
    for (path, argv, says), (code, _, err, loaded) in zip(cases, found, strict=True):
        err = err.splitlines()
        assert code == 2 and len(err) == 1 and says in err[0] and err[0].startswith("error: "), (path, argv, err)
        assert loaded == [], (path, argv, loaded)


def test_a_value_list_that_starts_with_a_negative_number_is_a_value():
    """`--tokens -1,2` was "unrecognized option -1,2" (argparse takes only -N and -N.N for values), where
    `--tokens=-1,2` named the id outside the vocabulary; both are now the value they are."""
    from shared_config.cli import Parser

    parser = Parser(prog="p")
    parser.add_argument("--tokens")
    for argv in (["--tokens", "-1,2"], ["--tokens", "-1, -2"], ["--tokens=-1,2"]):
        assert parser.parse_args(argv).tokens == argv[-1].removeprefix("--tokens=")
    with pytest.raises(SystemExit):
        parser.parse_args(["--tokens", "-x"])  # an option still: one error line


@pytest.mark.parametrize("tool, argv, says", [
    ("compare", ["--set", "batch_size=16"], "argument --set: batch_size is no spec key: this command takes it as "
                                            "--batch-size"),
    ("compare", ["--sweep", "steps=1,2"], "argument --sweep: steps is no spec key: this command takes it as --steps"),
    ("profile_step", ["--set", "seq_len=8"], "argument --set: seq_len is no spec key: this command takes it as "
                                             "--seq-len"),
    ("train", ["--backend", "jax", "--set", "eval_every=5"], "argument --set: eval_every is no spec or train config "
                                                             "key: this command takes it as --eval-every"),
    ("parity_report", ["--spec", "tiny", "--set", "seq=8"], "argument --set: seq is no spec key: this command takes "
                                                            "it as --seq"),
    ("init_checkpoint", ["--spec", "tiny", "--out", "x.safetensors", "--set", "seed=3"],
     "argument --set: seed is no spec key: this command takes it as --seed"),
    ("compare_norms", ["--set", "out=x"], "argument --set: out is no spec or train config key: this command takes it "
                                          "as --out"),
])
def test_a_set_key_that_is_the_command_s_own_option_is_named(tool, argv, says, capsys):
    """`compare.py --set batch_size=16` said "unknown spec key 'batch_size' (did you mean 'vocab_size'?)": a --set
    or --sweep key that is no key of the spec (or train config) but spells one of the command's options names it."""
    from bench import compare, profile_step

    if tool in ("compare", "profile_step"):
        parse = {"compare": compare.parse_args, "profile_step": profile_step.parse_args}[tool]
    else:  # init_checkpoint parses in main
        parse = getattr(load_script(tool), "parse_args", load_script(tool).main)
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {says}\n", err
