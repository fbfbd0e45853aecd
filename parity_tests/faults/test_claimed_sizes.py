"""Sizes a file or a spec claims are checked before anything is allocated (docs/checkpoints.md, "Bad input, limits
and failures"): a layout of millions of layers, a header of millions of tensors, a job past the machine's memory
is refused in one line, in bounded time and memory; a spec claiming more than its file holds is a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import shared_config.formats
import shared_config.formats.safetensors
import shared_config.resources
from shared_config import CheckpointError, init_weights, layout, load_spec
from shared_config.resources import ResourceError, layout_size
from shared_config.spec import CHOICES

from ..support.common import (HYBRID, HYBRID_GQA, MIXERS, bench_module, case_ids, fla_dir, load_script, make_spec,
                              one_line, peak_memory, quick_first, run_limited, with_metadata_spec)

convert = load_script("convert").convert


SIZED_SPECS = [{}, dict(norm_type="derf", norm_placement="peri", norm_bias=True, qk_norm=True),
               dict(position="learned", embed_scale="learnable", tie_embeddings=True, mlp="gelu"),
               dict(n_layers=7, fused_qkv=False, param_dtype="bfloat16"),
               # blocks that differ by index: HybridNorm*'s block 0, and the other placements' slot sets
               dict(norm_placement="hybrid_star"), dict(norm_placement="deepnorm", norm_type="dyt"),
               dict(norm_placement="pre_post", norm_type="layernorm", norm_bias=True),
               dict(norm_placement="post"), dict(norm_placement="hybrid", norm_type="dyt"),
               # every other token mixer
               dict(**MIXERS["gla"], norm_type="dyt", gla_output_norm="same"),
               # hybrid stacks: blocks that differ by mixer, every 2nd and every 3rd layer attention
               dict(**HYBRID), {**HYBRID, "gla_attention_every": 3, "norm_placement": "peri"}, dict(**HYBRID_GQA),
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


# routed: >= 2 blocks; a hybrid: at least gla_attention_every
SIZED = [(c, L) for c in SIZED_SPECS for L in (1, 2, 9, 12, 13)
         if L >= c.get("gla_attention_every", 1 + ("routing" in c))]


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
    assert resources.train_bytes(spec, 64, 1024) > 80 * 2**30  # 12 layers' [B, T, 12 D + 3 F] alone: 54 GiB


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
        bench_module("profile_step").main(["--set", "n_layers=" + "9" * 400])
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


@pytest.mark.parametrize("read", ["convert", "jax", "torch"])
def test_an_fla_config_claiming_a_million_layers_is_refused_before_its_layout_is_built(tmp_path, read):
    import jax_model
    import torch_model

    fla = fla_dir(tmp_path, num_hidden_layers=10**6)
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
    profile = bench_module("profile_step")
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
        src = fla_dir(tmp_path, vocab_size=10**14)
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


def test_a_bpe_vocabulary_past_what_the_text_holds_is_cut_to_it_before_the_trainer_reserves_it(tmp_path, monkeypatch):
    """tokenizers' BpeTrainer reserves room for --vocab-size tokens up front: --vocab-size 2**32 on a 5 KB text was a
    283 GB allocation and a Rust abort with its stack trace. A BPE learns at most 256 + one token a byte of its text;
    where even that cannot fit (a large corpus), the memory check refuses it in one line."""
    prepare = load_script("prepare_data")
    (tmp_path / "story.txt").write_text("Once upon a time, a tiny story.\n" * 50)
    prepare.main([str(tmp_path / "story.txt"), "--out", str(tmp_path / "data"), "--tokenizer", "bpe",
                  "--vocab-size", str(2**32), "--quiet"])
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"] <= 256 + 32 * 50
    monkeypatch.setattr(shared_config.resources, "machine_memory", lambda: (10**5, "of memory on this machine"))
    with pytest.raises(ResourceError, match="training a BPE of up to 1,856 tokens needs about .* lower --vocab-size"):
        prepare.learnable_vocab(tmp_path / "story.txt", 2**32)


def test_a_spec_of_more_tensors_than_a_file_may_list_is_refused_before_the_draws(tmp_path, monkeypatch):
    """init_checkpoint.py --set n_layers=200000 of tiny widths drew for 80 s and 2 GB, then failed to write ("header too
    large"); at 20,000 layers it wrote a checkpoint every reader here refuses (over MAX_TENSORS), and train.py a run
    whose optimizer.safetensors (m and v: twice the tensors) no --resume could read."""
    from shared_config import SpecError
    from shared_config.formats.safetensors import MAX_TENSORS
    from shared_config.run import resolve_run

    init = load_script("init_checkpoint")
    monkeypatch.setattr(init, "iter_init_weights", lambda *a: iter(lambda: pytest.fail("drew the weights"), None))
    narrow = ["--set", "d_model=4", "--set", "n_heads=1", "--set", "n_kv_heads=1", "--set", "d_ff=4", "--set",
              "head_dim=4"]
    layers = MAX_TENSORS // 9 + 1  # 9 tensors a layer: past the limit by a few
    with pytest.raises(SpecError, match=f"n_layers={layers}: its checkpoint would list 100,0.. tensors, over"):
        init.main(["--spec", "tiny", "--set", f"n_layers={layers}", *narrow, "--out", str(tmp_path / "x.safetensors")])
    train = load_script("train")
    with pytest.raises(SpecError, match="n_layers=6000: a run's optimizer.safetensors would list 108,006 tensors"):
        resolve_run(train.parse_args(["--backend", "torch", "--set", "n_layers=6000", *narrow, "--out",
                                      str(tmp_path / "run")]))
    assert list(tmp_path.iterdir()) == []


def test_the_memory_bound_counts_every_mixer_and_refuses_one_it_does_not_know():
    """layer_values counted any mixer but attention as GLA's values: each mixer of CHOICES has its count in every
    remat mode (a new one fails here until it has its branch), and an unknown one is an error, as flops_split's."""
    for mixer in CHOICES["mixer"]:
        for remat in ("none", "block", "full"):
            assert shared_config.resources.layer_values(make_spec(**MIXERS[mixer]), mixer, 2, 64, remat) > 0
    with pytest.raises(ValueError, match="^layer_values: no count for mixer='not-a-mixer'"):
        shared_config.resources.layer_values(make_spec(), "not-a-mixer", 2, 64)
