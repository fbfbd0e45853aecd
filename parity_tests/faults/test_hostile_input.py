"""Hostile input and faults (docs/checkpoints.md, "Bad input, limits and failures"): one `error:` line and a documented
exit code, bounded time and memory before a refusal, nothing lost or left behind. One section per kind of fault."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import shared_config.files
import shared_config.formats
import shared_config.formats.safetensors
import shared_config.limits
import shared_config.resources
from shared_config import CheckpointError, SpecError, init_weights, layout, load_spec, run_dir, save_checkpoint
from shared_config.cli import UsageError, fail, run as cli_run
from shared_config.limits import MAX_NESTING, MAX_YAML_BYTES
from shared_config.resources import ResourceError, layout_size
from shared_config.spec import CHOICES
from shared_config.train_config import load_train_config

from ..support.common import (MIXERS, ROOT, case_ids, checkout_env, load_script, make_spec, quick_first,
                              run_script)

convert_module = load_script("convert")
convert = convert_module.convert
DEEP_JSON = "[" * 200_000 + "]" * 200_000
DEEP_YAML = "a: " + "[" * 100_000 + "]" * 100_000 + "\n"
# "billion laughs": each level refers to the one before nine times, 9^20 leaves in 22 lines
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join(['*' + ('a' if i == 0 else f'l{i - 1}')] * 9)}]\n" for i in range(20)
)


def one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """A CLI's error contract: exit `code`, one stderr line "error: ..." holding every fragment, no traceback."""
    assert result.returncode == code, f"exit {result.returncode}: {result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def run_limited(script: str, *args, fsize: int | None = None, memory: int | None = None, cwd=None):
    """scripts/SCRIPT.py (or bench/...) in a subprocess whose files may not grow past `fsize` bytes (a full disk,
    as EFBIG) and whose address space is capped at `memory` bytes."""

    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    path = ROOT / script if "/" in script else ROOT / "scripts" / f"{script}.py"
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          env=checkout_env(), cwd=cwd, timeout=600, preexec_fn=limit)


def peak_memory(fn) -> tuple[BaseException | None, int]:
    """(what `fn()` raised, the peak bytes Python and numpy allocated meanwhile)."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except BaseException as e:  # noqa: BLE001 (returned to the test)
        raised = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def safetensors_file(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def with_metadata_spec(src: Path, dst: Path, spec_text: str) -> Path:
    """A copy of the canonical file `src` whose metadata spec is replaced by `spec_text` (tensors unchanged)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["spec"] = spec_text
    return safetensors_file(dst, json.dumps(header).encode(), raw[8 + n :])


@pytest.fixture
def canonical(tmp_path) -> Path:
    spec = make_spec()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, init_weights(spec, 0), spec)
    return path


def dead_pid() -> int:
    """The id of a process that has exited (a writer killed with -9)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- 1. sizes a file or a spec claims are checked before anything is allocated -------------------


SIZED_SPECS = [{}, dict(norm_type="derf", norm_placement="peri", norm_bias=True, qk_norm=True),
               dict(position="learned", embed_scale="learnable", tie_embeddings=True, mlp="gelu"),
               dict(n_layers=7, fused_qkv=False, param_dtype="bfloat16"),
               # blocks that differ by index: HybridNorm*'s block 0, and the other placements' slot sets
               dict(norm_placement="hybrid_star"), dict(norm_placement="deepnorm", norm_type="dyt"),
               dict(norm_placement="pre_post", norm_type="layernorm", norm_bias=True),
               dict(norm_placement="post"), dict(norm_placement="hybrid", norm_type="dyt"),
               # every other token mixer
               dict(**MIXERS["gla"], norm_type="dyt", gla_output_norm="same"),
               # routing's every other block (mod, dtf's decision/dynamic pairs), and all blocks with HybridNorm*
               dict(routing="mod"), dict(routing="dtf"),
               dict(routing="mod", routing_layers="all", norm_placement="hybrid_star")]


def test_the_sized_specs_hold_every_placement_mixer_and_routing():
    """SIZED_SPECS is written by hand, and layout_size's shortcut holds only for blocks that differ as it assumes: a
    placement, mixer or routing kind added to the spec's CHOICES is checked here only once a spec uses it."""
    specs = [make_spec(**c) for c in SIZED_SPECS]
    for field in ("norm_placement", "mixer", "routing"):
        missing = set(CHOICES[field]) - {getattr(s, field) for s in specs}
        assert not missing, f"no SIZED_SPECS row with {field} in {sorted(missing)}"


SIZED = [(c, L) for c in SIZED_SPECS for L in (1, 2, 9, 12, 13) if L > 1 or "routing" not in c]  # routed: >= 2 blocks


@pytest.mark.parametrize("changes,n_layers", SIZED,
                         ids=[f"{name}-L{L}" for name, (_, L) in zip(case_ids([c for c, _ in SIZED]), SIZED)])
def test_layout_size_is_the_layout_tables_count_computed_arithmetically(changes, n_layers):
    spec = make_spec(**changes).replace(n_layers=n_layers)
    table = layout(spec)
    sizes = [int(np.prod(t.shape)) for t in table]
    assert layout_size(spec) == (len(table), sum(sizes), max(sizes))


def test_activations_count_against_host_memory_only_without_an_accelerator(monkeypatch):
    from shared_config import resources

    spec = load_spec("small")
    params = layout_size(spec)[1]
    monkeypatch.setattr(resources, "accelerator_present", lambda: True)  # activations live in the device's memory
    assert resources.train_bytes(spec, 64, 1024) == 32 * params
    assert resources.forward_bytes(spec, 64, 1024) == 2 * 4 * params
    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    assert resources.train_bytes(spec, 64, 1024) > 100 * 2**30  # [H, T, T] attention weights of 12 layers alone: 36 GiB


def test_the_parity_reports_estimate_counts_its_numpy_arrays_on_any_machine(monkeypatch):
    """parity_report.py's taps (float64) and logits (float32) are numpy arrays, on the host whatever the device; the
    backward's activations count only without an accelerator, where they outgrow the logits' float64 comparison."""
    from shared_config import resources

    spec, B, T = load_spec("tiny"), 100_000, 8
    host = 2 * 4 * layout_size(spec)[1] + 16 * (3 * spec.L + 2) * B * T * spec.D + (8 + 24) * B * T * spec.V
    monkeypatch.setattr(resources, "accelerator_present", lambda: True)
    assert resources.report_bytes(spec, B, T) == host
    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    # 3 layers' [B, T, 12 D + 3 F] activations alone: 18 GiB, in place of the comparison's 4.6
    assert resources.report_bytes(spec, B, T) > host + 10 * 2**30


def test_a_canonical_file_whose_spec_claims_ten_million_layers_is_refused_before_its_layout_is_built(canonical):
    spec = json.loads(shared_config.formats.safetensors.read_header(canonical)["__metadata__"]["spec"])
    huge = with_metadata_spec(canonical, canonical.with_name("huge.safetensors"),
                              json.dumps({**spec, "n_layers": 10**7}))
    raised, peak = peak_memory(lambda: convert(huge, canonical.with_name("out.pt")))
    assert isinstance(raised, CheckpointError), raised
    assert ("the spec implies 90,000,003 tensors (10,000,000 layers" in str(raised)
            and "the file holds 21" in str(raised))
    assert peak < 50 * 2**20  # the table of 9e7 entries would take gigabytes


def test_sizes_past_floats_range_are_refused_in_one_line_not_an_overflow(canonical):
    """`--set n_layers=` 400 nines: the memory check's and the tensor count's GiB (`bytes / 2**30`) were an
    OverflowError's traceback."""
    with pytest.raises(ResourceError, match=r"needs about \d\.\d{3}e\+398 GiB of memory"):
        _bench("profile_step").main(["--set", "n_layers=" + "9" * 400])
    spec = json.loads(shared_config.formats.safetensors.read_header(canonical)["__metadata__"]["spec"])
    huge = with_metadata_spec(canonical, canonical.with_name("huge.safetensors"),
                              json.dumps({**spec, "n_layers": 10**400}))
    with pytest.raises(CheckpointError, match=r"GiB\) but the file holds 21"):
        convert(huge, canonical.with_name("out.pt"))


def test_a_hugging_face_config_claiming_a_million_layers_is_refused_before_its_layout_is_built(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    raised, peak = peak_memory(lambda: convert(hf, tmp_path / "out.safetensors"))
    assert isinstance(raised, CheckpointError) and "1,000,000 layers" in str(raised), raised
    assert peak < 50 * 2**20


def test_a_pt_file_whose_spec_claims_a_million_layers_is_refused_before_its_layout_is_built(tmp_path, canonical):
    pt = tmp_path / "m.pt"
    convert(canonical, pt)
    obj = torch.load(pt, weights_only=True)
    obj["spec"] = json.dumps({**json.loads(obj["spec"]), "n_layers": 10**6})
    torch.save(obj, pt)
    raised, peak = peak_memory(lambda: convert(pt, tmp_path / "out.safetensors"))
    assert isinstance(raised, CheckpointError) and "1,000,000 layers" in str(raised), raised
    assert peak < 50 * 2**20


def _many_tensors(path: Path, n: int, spec=None) -> Path:
    """A safetensors file of `n` one-byte tensors (the header written by hand: fast at any n), `spec` in its
    metadata."""
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    if spec is not None:
        header["__metadata__"] = {"spec": json.dumps(spec.to_dict())}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(n))
    return path


def test_a_header_of_too_many_tensors_is_refused_before_it_is_parsed(tmp_path):
    """10^6 one-byte tensors (a 78 MB header, under safetensors' 100 MB limit) took a minute and 2 GB to parse and
    check before the spec refused the file; the count is read off the raw header first. A count within the limit
    but far above the spec's is refused before any tensor is read."""
    from shared_config.formats.safetensors import MAX_TENSORS

    many = _many_tensors(tmp_path / "many.safetensors", MAX_TENSORS + 1)
    raised, peak = peak_memory(lambda: convert(many, tmp_path / "out.pt"))
    assert isinstance(raised, CheckpointError) and f"header lists {MAX_TENSORS + 1:,} tensors" in str(raised), raised
    assert peak < 60 * 2**20  # the raw header (8 MB here) and its count, no Python object per entry
    some = _many_tensors(tmp_path / "some.safetensors", 2000, load_spec("tiny"))
    with pytest.raises(CheckpointError, match="the file holds 2,000 tensors but the spec implies 3[0-9] "):
        convert(some, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def _fla_dir(tmp_path, **edits) -> Path:
    """A flash-linear-attention GLA directory of gla-tiny with config.json `edits` (None: the key deleted)."""
    spec = load_spec("gla-tiny")
    save_checkpoint(tmp_path / "g.safetensors", init_weights(spec, 0), spec)
    convert(tmp_path / "g.safetensors", tmp_path / "fla", to="fla")
    config = json.loads((tmp_path / "fla" / "config.json").read_text())
    config.update(edits)
    (tmp_path / "fla" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return tmp_path / "fla"


@pytest.mark.parametrize("read", ["convert", "jax", "torch"])
def test_an_fla_config_claiming_a_million_layers_is_refused_before_its_layout_is_built(tmp_path, read):
    import jax_model
    import torch_model

    fla = _fla_dir(tmp_path, num_hidden_layers=10**6)
    readers = {"convert": lambda: convert(fla, tmp_path / "out.safetensors"),
               "jax": lambda: jax_model.from_pretrained(fla), "torch": lambda: torch_model.from_pretrained(fla)}
    raised, peak = peak_memory(readers[read])
    assert isinstance(raised, CheckpointError) and "1,000,000 layers" in str(raised), raised
    assert "the file holds 31" in str(raised)
    assert peak < 50 * 2**20  # the table of 1.4e7 entries would take gigabytes (and a minute)


@pytest.mark.parametrize("script, args, says", quick_first([
    ("init_checkpoint", ["--spec", "tiny", "--set", "vocab_size=1000000000000", "--out", "x.safetensors"],
     "drawing 3 layers of d_model 96, vocab 1,000,000,000,000 needs about"),
    ("init_checkpoint", ["--spec", "tiny", "--set", "n_layers=1000000", "--out", "x.safetensors"],
     "drawing 1,000,000 layers of d_model 96, vocab 257 needs about"),
    ("train", ["--backend", "torch", "--set", "vocab_size=1000000000000", "--out", "run", "--quiet"],
     "training 3 layers of d_model 96, vocab 1,000,000,000,000 at batch"),
    ("bench/compare.py", ["--set", "vocab_size=1000000000000"], "the train job of tiny at batch 8 x seq 256 needs"),
    # the validation batches, built once: a 60 GiB allocation reported as the training job's (lower batch_size)
    ("train", ["--backend", "torch", "--eval-batches", "1000000000", "--out", "run", "--quiet"],
     "--eval-batches 1,000,000,000 (validation batches of 8 x 129 tokens, kept for every evaluation) needs about"),
], 1, multi=True), ids=["init-vocab", "init-layers", "train-vocab", "bench-vocab", "train-eval-batches"])
def test_commands_refuse_jobs_that_cannot_fit_in_memory_before_allocating(tmp_path, script, args, says):
    result = run_limited(script, *args, cwd=tmp_path)
    one_line(result, 3, says, "GiB of memory", "of memory on this machine")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even an empty run directory


def test_profile_step_refuses_a_job_that_cannot_fit_before_allocating():
    profile = _bench("profile_step")
    with pytest.raises(ResourceError, match="the train job of tiny at batch 8 x seq 256 needs about .* GiB of memory"):
        profile.main(["--set", "n_layers=1000000"])


def test_the_memory_estimate_counts_the_processs_address_space_limit(tmp_path):
    """A job that would fit the machine but not this process's RLIMIT_AS is refused naming that limit."""
    result = run_limited("init_checkpoint", "--spec", "tiny", "--set", "vocab_size=1000000", "--out", "x.safetensors",
                         memory=2**30, cwd=tmp_path)
    one_line(result, 3, "vocab 1,000,000 needs about 2.5 GiB of memory, 1.0 GiB allowed to this process (RLIMIT_AS)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("build", ["jax", "torch", "numpy"])
def test_library_builds_refuse_a_spec_that_cannot_fit_before_allocating(build, monkeypatch):
    """The Python API, not only the commands: `Transformer(spec)` in either twin and `init_weights` refuse a spec too
    large for the machine before any allocation. d_model 10^6 was a 12 TB allocation failing in each framework's own
    words; a spec just past the memory, allocated tensor by tensor, would have taken the machine's memory first."""
    import jax_model
    import torch_model
    from flax import nnx

    builds = {"jax": lambda s: jax_model.Transformer(s, rngs=nnx.Rngs(0)), "torch": torch_model.Transformer,
              "numpy": lambda s: init_weights(s, 0)}
    huge = make_spec(d_model=10**6, n_heads=8, n_kv_heads=8)
    with pytest.raises(ResourceError, match=r"d_model 1,000,000.* needs about [\d,.]+ GiB of memory, .*smaller spec"):
        builds[build](huge)
    tiny = load_spec("tiny")  # about 0.5M parameters: refused by a 1 MiB machine, each tensor of it would fit
    monkeypatch.setattr(shared_config.resources, "machine_memory", lambda: (2**20, "of memory on this machine"))
    with pytest.raises(ResourceError, match="0.0 GiB of memory on this machine; use a smaller spec"):
        builds[build](tiny)


@pytest.mark.parametrize("fmt", ["flax", "safetensors", "hf", "torch"])
def test_a_checkpoint_too_large_for_memory_is_refused_before_its_tensors_are_read(tmp_path, canonical, fmt,
                                                                                  monkeypatch):
    """An Orbax directory of 84 KB held 257 MB of (compressed) zeros: a small directory could claim any size, and
    the reader restored it all. Every reader now weighs the spec's weights against the memory before reading."""
    import jax_model

    src = tmp_path / {"flax": "m-flax", "safetensors": "m.safetensors", "hf": "m-hf", "torch": "m.pt"}[fmt]
    if fmt != "safetensors":
        convert(canonical, src, to=fmt)
    else:
        src = canonical
    monkeypatch.setattr(shared_config.resources, "machine_memory", lambda: (2**10, "of memory on this machine"))
    for read in (shared_config.formats.read_checkpoint, jax_model.from_pretrained):
        with pytest.raises(ResourceError, match=f"reading {src}.* needs about 0.0 GiB of memory, 0.0 GiB of memory "
                                                "on this machine; it needs a machine with more memory"):
            read(src)


def _claim_vocab(src: Path, fmt: str, vocab: int) -> None:
    """Make the spec that `src` (in `fmt`) carries claim `vocab` tokens, its tensors left as they are."""
    if fmt == "hf":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    elif fmt == "flax":
        (src / "spec.json").write_text(json.dumps({**json.loads((src / "spec.json").read_text()), "vocab_size": vocab}))
    elif fmt == "torch":
        obj = torch.load(src, weights_only=True)
        torch.save({**obj, "spec": json.dumps({**json.loads(obj["spec"]), "vocab_size": vocab})}, src)
    else:
        tensors, meta = shared_config.read_safetensors(src)
        meta = {**meta, "spec": json.dumps({**json.loads(meta["spec"]), "vocab_size": vocab})}
        shared_config.save_safetensors(tensors, src, meta)


@pytest.mark.parametrize("fmt", ["flax", "safetensors", "hf", "torch", "fla"])
def test_a_spec_claiming_more_than_its_file_holds_is_a_bad_file_not_a_memory_shortage(tmp_path, canonical, fmt):
    """A config.json (or metadata, spec.json, .pt spec) claiming vocab_size 10^14 over a file of 97 embedding rows was
    'needs about 35,762,786.9 GiB of memory ... it needs a machine with more memory' (exit code 3): the memory weighed
    is what the file's tensors hold, at most, and the file is refused by its shapes (exit code 2)."""
    import jax_model

    src = tmp_path / {"flax": "m-flax", "safetensors": "m.safetensors", "hf": "m-hf", "torch": "m.pt"}.get(fmt, "")
    if fmt == "fla":
        src = _fla_dir(tmp_path, vocab_size=10**14)
    elif fmt != "safetensors":
        convert(canonical, src, to=fmt)
    else:
        src = canonical
    if fmt != "fla":
        _claim_vocab(src, fmt, 10**14)
    for read in (shared_config.formats.read_checkpoint, jax_model.from_pretrained):
        with pytest.raises(CheckpointError, match=r"shape mismatches: model.embed_tokens.(weight|embedding) expected "
                                                  r"\[100000000000000, \d+\] found \[\d+, \d+\]"):
            read(src)


# --- 2. parsing is bounded: sizes, nesting, aliases, quoted values ---------------------------------


def test_json_nested_deeper_than_the_limit_is_refused_in_every_reader(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    cases = {}
    (hf / "config.json").write_text(DEEP_JSON)
    cases["config.json"] = (hf, hf / "config.json")
    index = tmp_path / "sharded"
    convert(canonical, index, to="hf")
    (index / "model.safetensors").rename(index / "model-00001-of-00001.safetensors")
    (index / "model.safetensors.index.json").write_text(DEEP_JSON)
    cases["index"] = (index, index / "model.safetensors.index.json")
    cases["header"] = (safetensors_file(tmp_path / "deep.safetensors", DEEP_JSON.encode()),) * 2
    cases["metadata spec"] = (with_metadata_spec(canonical, tmp_path / "meta.safetensors", DEEP_JSON),) * 2
    pt = tmp_path / "deep.pt"
    torch.save({"spec": DEEP_JSON, "state_dict": {}}, pt)
    cases[".pt spec"] = (pt, pt)
    for name, (src, named) in cases.items():
        with pytest.raises(CheckpointError) as e:
            convert(src, tmp_path / "out.safetensors")
        msg = str(e.value)
        assert msg.startswith(str(named)) and f"JSON nested deeper than {MAX_NESTING} levels" in msg, (name, msg)
    run = tmp_path / "run"
    (run / "step-00000001").mkdir(parents=True)
    (run / "step-00000001" / "state.json").write_text(DEEP_JSON)
    with pytest.raises(CheckpointError, match="state.json: JSON nested deeper"):
        run_dir.read_state(run / "step-00000001")
    (run / "metrics.jsonl").write_text('{"step": 1}\n' + DEEP_JSON + "\n")
    with pytest.raises(CheckpointError, match="metrics.jsonl: line 2: JSON nested deeper"):
        run_dir.read_metrics(run / "metrics.jsonl")


@pytest.mark.parametrize("text, says", [(DEEP_YAML, f"YAML nested deeper than {MAX_NESTING} levels"),
                                        (LAUGHS, "more than 100 YAML aliases")], ids=["deep", "billion-laughs"])
def test_yaml_nesting_and_alias_expansion_are_bounded_for_specs_and_train_configs(tmp_path, text, says):
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    for load in (load_spec, load_train_config):
        raised, peak = peak_memory(lambda: load(str(path)))
        assert isinstance(raised, SpecError) and says in str(raised) and str(path) in str(raised), raised
        assert peak < 50 * 2**20
    with pytest.raises(SpecError, match="not a YAML scalar"):
        shared_config.parse_overrides([f"d_model={DEEP_YAML[3:]}"])


def test_a_key_given_twice_is_refused_in_every_yaml_and_json_reader(tmp_path, canonical):
    """PyYAML and json keep the last of two equal keys silently: a spec with d_model twice built the other model."""
    spec_yaml = tmp_path / "spec.yaml"
    spec_yaml.write_text((ROOT / "shared_config/specs/tiny.yaml").read_text() + "d_model: 48\n")
    with pytest.raises(SpecError, match=r"duplicate key 'd_model' \(line 9\)"):
        load_spec(str(spec_yaml))
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("lr: 0.001\nsteps: 3\nlr: 0.1\n")
    with pytest.raises(SpecError, match="duplicate key 'lr'"):
        load_train_config(str(train_yaml))
    with pytest.raises(SpecError, match="not a YAML scalar"):
        shared_config.parse_overrides(["d_model={a: 1, a: 2}"])
    with safe_open(str(canonical), "np") as f:  # the writer's own spec JSON, with a second d_model added
        text = f.metadata()["spec"]
    twice = with_metadata_spec(canonical, tmp_path / "twice.safetensors", text[:-1] + ', "d_model": 48}')
    with pytest.raises(CheckpointError, match="duplicate key 'd_model'"):
        shared_config.formats.read_checkpoint(twice)
    # a YAML merge key (`<<: *base`) is overridden by the mapping's own keys by design: not a duplicate
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n")
    assert shared_config.limits.parse_yaml(merged.read_text())["use"] == {"x": 3, "y": 2}


def test_files_read_whole_are_capped_before_reading(tmp_path, canonical):
    """A sparse multi-GB config.json or spec YAML is refused from its size alone."""
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    with open(hf / "config.json", "r+b") as f:
        f.truncate(4 * 2**30)
    raised, peak = peak_memory(lambda: convert(hf, tmp_path / "out.safetensors"))
    assert isinstance(raised, CheckpointError) and "4,294,967,296 bytes, over the 67,108,864-byte limit" in str(raised)
    spec = tmp_path / "big.yaml"
    with open(spec, "wb") as f:
        f.truncate(MAX_YAML_BYTES + 1)
    with pytest.raises(SpecError, match="over the 1,048,576-byte limit"):
        load_spec(str(spec))
    assert peak < 50 * 2**20


def test_values_quoted_in_errors_are_shortened(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    for key, value in [("hidden_act", "x" * 10**6), ("rope_parameters", list(range(10**5))),
                       ("layer_types", [{"a": 1}] * 1000), ("intermediate_size", "9" * 10**6)]:
        (hf / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError) as e:
            convert(hf, tmp_path / "out.safetensors")
        assert len(str(e.value)) < len(str(hf)) + 300, (key, len(str(e.value)))
    yaml_spec = tmp_path / "s.yaml"
    yaml_spec.write_text(f"{'k' * 10**5}: 1\n")
    with pytest.raises(SpecError) as e:
        load_spec(str(yaml_spec))
    assert len(str(e.value)) < len(str(yaml_spec)) + 400
    header = {"a": {"dtype": "F32", "shape": [1] * 10**5, "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError) as e:
        convert(safetensors_file(tmp_path / "s.safetensors", header, bytes(4)), tmp_path / "o.pt", spec="tiny")
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("edits, says", [
    ({"intermediate_size": None, "hidden_ratio": float("nan")}, "hidden_ratio must be a finite number, got nan"),
    ({"intermediate_size": None, "hidden_ratio": 1e308},
     "hidden_ratio × hidden_size must be in (0, 2^62), got 1e+308 × 64"),
    ({"intermediate_size": None, "hidden_ratio": "x"}, "hidden_ratio must be a finite number, got 'x'"),
    ({"intermediate_size": None, "hidden_ratio": -2}, "hidden_ratio × hidden_size must be in (0, 2^62), got -2 × 64"),
    ({"intermediate_size": None, "hidden_size": 10**400}, "hidden_ratio × hidden_size must be in (0, 2^62)"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"intermediate_size": None, "hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"num_heads": True}, "num_heads must be an integer, got true"),
    ({"norm_eps": float("inf")}, "norm_eps must be a finite number, got inf"),
    ({"fuse_norm": "false"}, "fuse_norm must be true or false, got 'false'"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false, got 0"),
], ids=["ratio-nan", "ratio-1e308", "ratio-str", "ratio-negative", "size-huge-int", "size-str", "size-str-no-ff",
        "heads-bool", "eps-inf", "fuse-str", "tie-int"])
def test_fla_config_values_are_typed_before_any_arithmetic(tmp_path, edits, says):
    fla = _fla_dir(tmp_path, **edits)
    with pytest.raises(CheckpointError) as e:
        convert(fla, tmp_path / "out.safetensors")
    assert str(e.value).startswith(str(fla / "config.json")) and says in str(e.value), str(e.value)
    assert len(str(e.value)) < len(str(fla)) + 200
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("edits, says", [
    ({"hidden_size": "48"}, "hidden_size must be an integer, got '48'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer, got 2.0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number, got nan"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
], ids=["size-str", "layers-float", "eps-nan", "tie-str"])
def test_hugging_face_config_values_are_typed_naming_the_key(tmp_path, canonical, edits, says):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **edits}))
    with pytest.raises(CheckpointError) as e:
        convert(hf, tmp_path / "out.safetensors")
    assert str(e.value).startswith(str(hf / "config.json")) and says in str(e.value), str(e.value)


def test_an_error_line_is_capped(capsys):
    with pytest.raises(SystemExit):
        fail("y" * 100_000)
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and len(line) < 2100 and "98,000 more characters" in line


# --- 3. library exceptions become one line ---------------------------------------------------------


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
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(f'{{"step": 1}}\n{line}\n{{"step": 2}}\n')
    with pytest.raises(CheckpointError, match=f"metrics.jsonl: line 2: {says}"):
        run_dir.truncate_metrics(metrics, 1)
    metrics.write_text('{"step": 1}\n{"step": 2, "lo')  # a last line cut by a crash: skipped
    assert run_dir.read_metrics(metrics) == [{"step": 1}]


def test_a_metrics_line_past_the_limit_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    """Iterating the file read a line whole before checking its length: a file without newlines, all of it."""
    monkeypatch.setattr(run_dir, "MAX_JSON_BYTES", 2**20)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n' + b"x" * (16 * 2**20))
    raised, peak = peak_memory(lambda: run_dir.read_metrics(metrics))
    assert isinstance(raised, CheckpointError) and "line 2 is over the 1,048,576-byte limit" in str(raised), raised
    assert peak < 4 * 2**20, peak


def test_out_of_memory_in_the_bench_names_the_job_and_what_to_lower(monkeypatch, capsys):
    compare, timing = _bench("compare"), _bench("timing")

    def oom(args, specs, backends, kernels, on_progress=None, during=None):
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


def _bench(name: str):
    import importlib

    return importlib.import_module(f"bench.{name}")


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


def test_a_float64_past_float32s_range_is_refused_without_a_warning(tmp_path, canonical):
    weights, _ = shared_config.formats.safetensors.read_safetensors(canonical)
    weights = {k: v.astype(np.float64) for k, v in weights.items()}
    weights["model.norm.weight"][0] = 1e300
    src = tmp_path / "f64.safetensors"
    save_file(weights, src, metadata={"spec": make_spec().to_json()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would print two lines before the error line
        with pytest.raises(CheckpointError, match="non-finite values"):
            convert(src, tmp_path / "o.pt")
        convert(src, tmp_path / "o.pt", allow_nonfinite=True)
        with pytest.raises(CheckpointError, match="non-finite values"):
            convert(src, tmp_path / "o2.safetensors", dtype="bfloat16")


# --- 4. killed writes leave nothing behind, and a replace never loses the old copy ------------------


def test_a_later_write_removes_temps_of_killed_writers_only(tmp_path, canonical):
    dst = tmp_path / "out.safetensors"
    stale, live = (tmp_path / f".out.safetensors.{dead_pid()}.x1.tmp",
                   tmp_path / f".out.safetensors.{os.getppid()}.x2.tmp")
    stale.write_bytes(b"partial")
    live.write_bytes(b"another writer's")  # a live process's write in progress is not touched
    stale_dir = tmp_path / f".out-hf.{dead_pid()}.x3.tmp"
    (stale_dir / "x").mkdir(parents=True)
    convert(canonical, dst)
    convert(canonical, tmp_path / "out-hf", to="hf")
    assert not stale.exists() and not stale_dir.exists() and live.exists()


def test_a_run_directory_is_recovered_from_a_killed_run(tmp_path):
    run = tmp_path / "run"
    (run / f".step-00000200.{dead_pid()}.abc.tmp" / "model.safetensors").parent.mkdir(parents=True)
    (run / ".step-00000100.deleting").mkdir()
    (run / f".metrics.jsonl.{dead_pid()}.q.tmp").write_text("x")
    (run / ".step-00000300.old").mkdir()  # a replace cut between its renames: the only copy
    run_dir.recover_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["step-00000300"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, canonical):
    """A write interrupted by SIGTERM removes its temp file and exits 143 with one line."""
    driver = tmp_path / "slow.py"
    driver.write_text(f"""
import sys, time
sys.argv = ["convert", {str(canonical)!r}, {str(tmp_path / 'out.safetensors')!r}]
import shared_config.formats.safetensors as io
from shared_config.cli import run
def slow(tensors, path, metadata=None):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    for _ in range(600):  # 60 s in steps: the kernel may hand SIGTERM to another thread (torch's, XLA's), and then
        time.sleep(0.1)   # Python runs its handler once the main thread's current sleep returns, not at once
io.save_file = slow
sys.path.insert(0, {str(ROOT / 'scripts')!r})
import convert
run(convert.main)
""")
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=checkout_env())
    assert p.stdout.readline() == "writing\n"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip() == "error: interrupted by SIGTERM; partial outputs removed", err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors", "slow.py"]


def test_a_replace_cut_between_its_renames_is_recovered_never_deleted(tmp_path, canonical, monkeypatch):
    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    os.replace(dst, tmp_path / ".out-hf.old")  # killed after moving the old copy aside, before the new one moved in

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_config.formats.safetensors, "save_file", crash)
    with pytest.raises(ResourceError):  # the rerun fails too: the old copy must be back, not deleted
        convert(canonical, dst, to="hf", force=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out-hf"]
    os.replace(dst, tmp_path / ".out-hf.old")
    with pytest.raises(UsageError, match="out-hf exists; pass --force"):  # the recovered copy is DST again
        convert(canonical, dst, to="hf")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before


def _driver(tmp_path, body: str) -> Path:
    """A Python script that runs `body` (which may patch the library) and then convert.py's main under cli.run."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / 'scripts')!r})
import convert
from shared_config.cli import run
{body}
run(convert.main)
""")
    return driver


def test_a_replace_killed_at_its_first_rename_still_leaves_the_destination(tmp_path, canonical):
    """kill -9 right after a replace's first rename (where the old directory used to move aside): the destination
    is there, the new copy, because the replace is one rename (an exchange)."""
    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    driver = _driver(tmp_path, f"""
real = os.replace
def replace(a, b):
    real(a, b)
    if str(b).endswith(".old"):
        os._exit(137)  # killed between the two renames of a replace
os.replace = replace
sys.argv[1:] = [{str(canonical)!r}, {str(dst)!r}, "--to", "hf", "--force"]
""")
    result = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=checkout_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py", "m.safetensors", "out-hf"]


def test_a_reader_that_finds_only_the_moved_aside_copy_puts_it_back(tmp_path, canonical):
    import torch_model

    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    os.replace(dst, tmp_path / ".out-hf.old")  # a replace without the exchange, killed between its renames
    torch_model.from_pretrained(dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert not (tmp_path / ".out-hf.old").exists()


def test_without_the_exchange_a_replace_falls_back_to_two_renames(tmp_path, canonical, monkeypatch):
    monkeypatch.setattr(shared_config.files, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    convert(tmp_path / "m.safetensors", dst, to="hf", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out-hf"]
    convert(dst, tmp_path / "back.safetensors")


WRITES = {"flax": "out-flax", "hf": "out-hf", "fla": "out-fla", "torch": "out.pt", "safetensors": "out.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("fmt", list(WRITES))
def test_sigterm_at_any_instant_of_a_write_is_exit_143_one_line_and_no_debris(tmp_path, fmt, delay):
    """SIGTERM a fixed delay after a write starts (the first temp name is taken), for every format's writer
    (Orbax's runs native threads): exit 143 with one line and nothing left, or, when the write had finished,
    exit 0 and the complete destination."""
    src = tmp_path / "src.safetensors"
    spec = load_spec("gla-tiny") if fmt == "fla" else make_spec()
    save_checkpoint(src, init_weights(spec, 0), spec)
    dst = tmp_path / WRITES[fmt]
    driver = _driver(tmp_path, f"""
import tempfile
for name in ("mkstemp", "mkdtemp"):
    def started(*args, _real=getattr(tempfile, name), **kwargs):
        made = _real(*args, **kwargs)
        print("writing", flush=True)
        return made
    setattr(tempfile, name, started)
sys.argv[1:] = [{str(src)!r}, {str(dst)!r}, "--to", {fmt!r}]
""")
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=checkout_env())
    assert p.stdout.readline() == "writing\n"
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    left = sorted(x.name for x in tmp_path.iterdir())
    if p.returncode != 0:
        assert p.returncode == 143 and err.strip() == "error: interrupted by SIGTERM; partial outputs removed", (
            p.returncode, err[-2000:], left)
    if dst.name in left:  # the write had finished (the signal came after its rename): complete
        assert left == sorted(["driver.py", "src.safetensors", dst.name])
        convert(dst, tmp_path / "back.safetensors")
    else:
        assert left == ["driver.py", "src.safetensors"]


# --- 5. one writer per run directory ---------------------------------------------------------------


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with run_dir.lock_run(run):
        result = run_script("train", "--backend", "torch", "--out", run, "--steps", "2", "--quiet")
        one_line(result, 3, f"{run}: the run directory is being written by another process (PID {os.getpid()})")
        with pytest.raises(ResourceError, match=f"PID {os.getpid()}"):
            with run_dir.lock_run(run):  # a second open file in this very process is refused too
                pass
    with run_dir.lock_run(run):  # released
        pass
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


# --- 6. every copy of the spec and config in a checkpoint agrees ------------------------------------


def _run_with_checkpoint(tmp_path) -> Path:
    spec = make_spec()
    weights = init_weights(spec, 0)
    state = {"step": 3, "weights": weights, **{k: {n: np.zeros_like(w) for n, w in weights.items()} for k in "mv"}}
    cfg, data = load_train_config("cpu").to_dict(), {"source": "synthetic", "vocab_size": 97}
    info = {"backend": "jax", "data_position": {"seed": cfg["seed"], "step": 3}, "spec": spec.to_dict(),
            "train_config": cfg, "data": data}
    run_dir.write_json(tmp_path / "run.json", {"spec": spec.to_dict(), "train_config": cfg, "data": data})
    return run_dir.save_train_checkpoint(tmp_path, state, spec, info)


@pytest.mark.parametrize("edit, says", [
    (lambda s: s["spec"].update(norm_type="layernorm"), "norm_type: state.json 'layernorm' vs model.safetensors 'rms'"),
    (lambda s: s["spec"].update(rope_theta=500000.0), "rope_theta: state.json 500000.0 vs model.safetensors 10000.0"),
    (lambda s: s["data_position"].update(step=2), "state.json data_position is at step 2, state.json at 3"),
    (lambda s: s["data_position"].update(seed=7), "data_position seed 7 vs train_config seed 0"),
    (lambda s: s["train_config"].update(lr=1.0), "train_config lr: run.json 0.001 vs state.json 1.0"),
], ids=["norm_type", "rope_theta", "position-step", "position-seed", "lr-vs-run.json"])
def test_an_edited_copy_in_a_checkpoint_is_refused_naming_both_values(tmp_path, edit, says):
    path = _run_with_checkpoint(tmp_path)
    run_dir.read_state(path)  # intact: agrees
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as e:
        run_dir.load_train_checkpoint(path)
    assert says in str(e.value), str(e.value)


@pytest.mark.parametrize("changes", [{"grad_accum_steps": 2}, {"remat": "full"}, {"loss_chunk": 7},
                                     {"grad_accum_steps": 4, "remat": "block", "loss_chunk": 1}])
def test_memory_options_changed_by_a_resume_are_not_a_disagreement_with_run_json(tmp_path, changes):
    # run.json keeps the first invocation's train config; a resume may change the memory options each time
    path = _run_with_checkpoint(tmp_path)
    state = json.loads((path / "state.json").read_text())
    state["train_config"].update(changes)
    (path / "state.json").write_text(json.dumps(state))
    assert run_dir.read_state(path)["train_config"] == state["train_config"]


def test_train_resume_refuses_an_edited_state_json_in_one_line(tmp_path):
    path = _run_with_checkpoint(tmp_path)
    state = json.loads((path / "state.json").read_text())
    state["spec"]["norm_type"] = "layernorm"
    (path / "state.json").write_text(json.dumps(state))
    result = run_script("train", "--backend", "torch", "--out", tmp_path, "--resume", "--quiet")
    one_line(result, 2, "state.json and model.safetensors record different specs",
             "norm_type: state.json 'layernorm' vs model.safetensors 'rms'")


def _refused_without_blocking(read, fifo: Path):
    """What `read()` raised, run in a thread; a read still blocked on the writer-less FIFO after 20 s fails the
    test (the FIFO is then opened for writing and closed, so the blocked open returns and the thread ends)."""
    import threading

    raised = []

    def target():
        try:
            read()
        except BaseException as e:  # noqa: BLE001 (returned to the test)
            raised.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(20)
        pytest.fail(f"blocked opening the FIFO {fifo}")
    return raised[0] if raised else None


@pytest.mark.parametrize("name", ["state.json", "model.safetensors", "optimizer.safetensors", "../run.json",
                                  "../metrics.jsonl"])
def test_a_fifo_where_a_run_file_is_expected_is_refused_without_blocking(tmp_path, name):
    path = _run_with_checkpoint(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    fifo = (path / name).resolve()
    fifo.unlink()
    os.mkfifo(fifo)
    read = run_dir.read_metrics if name.endswith("jsonl") else run_dir.load_train_checkpoint
    raised = _refused_without_blocking(lambda: read(fifo if name.endswith("jsonl") else path), fifo)
    assert isinstance(raised, CheckpointError) and f"{fifo}: is a FIFO, not a regular" in str(raised), raised


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("fmt", ["hf", "fla"])
def test_a_fifo_in_a_checkpoint_directory_is_refused_without_blocking(tmp_path, canonical, fmt, name):
    src = _fla_dir(tmp_path) if fmt == "fla" else tmp_path / "hf"
    if fmt == "hf":
        convert(canonical, src, to="hf")
    from shared_config import fla, hf

    (src / name).unlink()
    os.mkfifo(src / name)
    raised = _refused_without_blocking(lambda: {"hf": hf.read_hf, "fla": fla.read_fla}[fmt](src), src / name)
    assert isinstance(raised, CheckpointError) and f"{src / name}: is a FIFO" in str(raised), raised


@pytest.mark.parametrize("name", ["meta.json", "tokenizer.json"])
def test_a_fifo_in_a_data_directory_is_refused_without_blocking(tmp_path, name):
    from shared_config.data import DataError, load_data

    for split in ("train", "val"):
        (tmp_path / f"{split}.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    os.mkfifo(tmp_path / name)
    raised = _refused_without_blocking(lambda: load_data(str(tmp_path)), tmp_path / name)
    assert isinstance(raised, DataError) and str(raised).startswith(f"{tmp_path / name}: "), raised
    assert "FIFO" in str(raised) or "not a regular file" in str(raised)


@pytest.mark.parametrize("vocab_size, says", [(10, "vocab_size is 10 but train.bin holds token id 255"),
                                               ("x", "vocab_size must be an integer >= 1, got 'x'")])
def test_train_refuses_a_meta_json_vocab_size_the_tokens_exceed(tmp_path, vocab_size, says):
    """The ids would index past the embedding (torch: IndexError; JAX: a non-finite loss): one line, before --out."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.bin").write_bytes((np.arange(4096) % 256).astype(np.uint16).tobytes())
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab_size, "tokenizer": "byte"}))
    result = run_script("train", "--backend", "torch", "--steps", "2", "--data", data, "--out", tmp_path / "out",
                        "--quiet")
    one_line(result, 2, f"{data / 'meta.json'}: {says}")
    assert not (tmp_path / "out").exists()


def test_train_resume_with_a_fifo_for_state_json_is_one_line(tmp_path):
    path = _run_with_checkpoint(tmp_path)
    (path / "state.json").unlink()
    os.mkfifo(path / "state.json")
    result = run_script("train", "--backend", "torch", "--out", tmp_path, "--resume", "--quiet")  # 600 s timeout
    one_line(result, 2, f"{path / 'state.json'}: is a FIFO, not a regular JSON file")


BAD_TOKENIZERS = [
    (b'{"version": "1.0", "model": {"type": "BPE"', "not a valid tokenizers file: EOF while parsing"),
    (b'{"version": "1.0", "model": {"type": "BPE", "vocab": "x"}}', "not a valid tokenizers file: invalid type"),
    (b"\xff\xfe{}", "not a valid tokenizers file: not UTF-8"),
]


@pytest.mark.parametrize("content, says", [*BAD_TOKENIZERS, (None, "is a FIFO, not a regular tokenizer file")],
                         ids=["truncated", "wrong-type", "not-utf8", "fifo"])
def test_a_bad_tokenizer_beside_the_weights_is_one_line(tmp_path, canonical, content, says):
    tokenizer = tmp_path / "tokenizer.json"
    os.mkfifo(tokenizer) if content is None else tokenizer.write_bytes(content)
    generate = load_script("generate")
    raised = _refused_without_blocking(lambda: generate.load_tokenizer(canonical, make_spec()), tokenizer)
    assert isinstance(raised, CheckpointError) and str(raised).startswith(f"{tokenizer}: {says}"), raised


@pytest.mark.slow
@pytest.mark.parametrize("content, says", BAD_TOKENIZERS, ids=["truncated", "wrong-type", "not-utf8"])
def test_a_bad_tokenizer_in_a_data_directory_is_refused_before_a_run_copies_it(tmp_path, content, says):
    """A run copies its data's tokenizer.json into every checkpoint: a broken one was copied without a word and
    refused only by generate.py --prompt. (A FIFO there: test_a_fifo_in_a_data_directory_is_refused_...)"""
    from shared_config.data import DataError, load_data

    for split in ("train", "val"):
        (tmp_path / f"{split}.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'tokenizer.json'}: {says}"), e.value


# --- 7. zero and empty are values, never "not given" -----------------------------------------------


def test_zero_and_empty_arguments_are_checked_not_defaulted(tmp_path, capsys):
    for tool in ("compare", "profile_step"):
        with pytest.raises(SystemExit) as e:
            _bench(tool).main(["--seq", "0"])
        assert e.value.code == 2
        assert capsys.readouterr().err == "error: argument --seq-len/--seq: must be an integer >= 1, got 0\n"
    one_line(run_script("train", "--backend", "torch", "--spec", "", "--out", tmp_path / "r", "--quiet"), 2,
             "no spec preset or file named ''")
    assert not (tmp_path / "r").exists()


def test_a_zero_rope_scaling_in_a_config_is_not_read_as_null(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    del config["rope_parameters"]
    (hf / "config.json").write_text(json.dumps({**config, "rope_scaling": 0}))
    with pytest.raises(CheckpointError, match="rope_scaling must be a JSON object, got 0"):
        convert(hf, tmp_path / "o.safetensors")


# --- 8. written files get the umask's permissions, whatever the format ----------------------------


def test_every_written_file_has_the_umasks_permissions(tmp_path, canonical):
    old = os.umask(0o027)
    try:
        for dst, to in [("o.safetensors", None), ("o.pt", None), ("o-hf", "hf"), ("o-flax", "flax")]:
            convert(canonical, tmp_path / dst, to=to)
        spec = make_spec()
        w = init_weights(spec, 0)
        state = {"step": 1, "weights": w, **{k: {n: np.zeros_like(x) for n, x in w.items()} for k in "mv"}}
        (tmp_path / "run").mkdir()
        run_dir.save_train_checkpoint(tmp_path / "run", state, spec, {"backend": "jax"})
    finally:
        os.umask(old)
    for p in tmp_path.rglob("*"):
        if p.name == "m.safetensors" or "o-flax/state" in str(p):  # Orbax's own files: its modes
            continue
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p


# --- 9. GLA's forget gates at the ends of their range: reset and open gates keep the recurrence's values ----


@pytest.mark.parametrize("scale", quick_first([1e7, 1e5]))
def test_gla_with_reset_and_open_gates_matches_the_float64_recurrence(scale):
    """Half the key channels' gate projections scaled by `scale`: per token, log α from about −scale/16 (a reset,
    down to −6e5 at 1e7) to 0 (α = 1), mixed within every chunk. The chunk form (chunk 64 over 70 tokens, 16-token
    sub-chunks) gives both twins the float64 recurrence's logits, and finite gradients on which they agree."""
    from shared_config.parity import FORWARD_TOL, GRAD_TOL, max_rel, rel_err

    from ..support import reference
    from ..support.common import tokens
    from ..model.test_gla import both_logits, gla_spec, gla_weights
    from ..support.train_common import both_loss_and_grads

    spec = gla_spec(norm_type="dyt")
    w = gla_weights(spec)
    for i in range(spec.L):
        p = f"model.layers.{i}.self_attn.gk_proj.1"
        w[f"{p}.weight"][::2] *= np.float32(scale)
        w[f"{p}.bias"][::2] = 0.0
    x = tokens(spec, seq=70)
    h = reference.norm(np.asarray(w["model.embed_tokens.weight"], np.float64)[x], w, "model.layers.0.input_layernorm",
                       spec)
    gk = (h @ w["model.layers.0.self_attn.gk_proj.0.weight"].T) @ w["model.layers.0.self_attn.gk_proj.1.weight"].T
    log_a = -np.logaddexp(0, -gk[..., ::2]) / spec.gla_gate_normalizer
    assert log_a.min() < -scale / 100 and log_a.max() > -1e-3, (log_a.min(), log_a.max())  # resets and open gates
    ref = reference.forward(w, spec, x)
    for name, got in zip(("jax", "torch"), both_logits(w, spec, x)):
        assert rel_err(got, ref) <= FORWARD_TOL, f"{name}: {rel_err(got, ref):.2e}"
    (_, gj), (_, gt) = both_loss_and_grads(w, spec, x[:, :45])
    assert all(np.isfinite(g).all() for g in (*gj.values(), *gt.values()))
    bad = {k: f"{max_rel(gj[k], gt[k]):.1e}" for k in gt if not max_rel(gj[k], gt[k]) <= GRAD_TOL}
    assert not bad, bad
