"""What the docs quote from the code, statically (nothing is run): every spec key and value has a row of a keys
table, every documented default is the code's default, the tolerance table quotes the bounds the tests use, each
limit a page quotes is the code's constant, and the corpus's entropies are the chain's."""

from __future__ import annotations

import re

import pytest

from ..support.common import ROOT, load_script
from .test_docs import PAGES, rel


def test_every_spec_key_and_value_has_a_docs_row():
    """Each field of ModelSpec is the first cell of a table row in docs/ (the keys table of spec.md, gla.md or
    routing.md), and each accepted value of an enum field is named in a row of its key: an option added to the spec
    without its line in the docs fails here."""
    import dataclasses

    from shared_config.spec import CHOICES, ModelSpec

    rows = [line.split("|") for page in PAGES[1:] for line in page.read_text().splitlines()
            if line.startswith("|") and line.count("|") > 2]
    missing = []
    for field in dataclasses.fields(ModelSpec):
        keyed = ["|".join(cells) for cells in rows if f"`{field.name}`" in cells[1]]
        if not keyed:
            missing.append(field.name)
        missing += [f"{field.name}: {v}" for v in CHOICES.get(field.name, ()) if not any(f"`{v}`" in r for r in keyed)]
    assert not missing, f"no docs table row for {missing}"


def table_rows(text: str, header: str | None = None) -> list[list[str]]:
    """The cells of every table row of a page, outer pipes cut; with `header`, only the body rows of the tables
    whose header row starts with it."""
    rows, keep = [], header is None
    for line in text.splitlines():
        if not (line.startswith("|") and line.count("|") > 2):
            keep = header is None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if header is not None and cells[0] == header.split("|")[0].strip() and "|".join(cells).startswith(
                "|".join(c.strip() for c in header.split("|"))):
            keep = True
        elif keep and not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows


def documented_value(text: str):
    """A default as a keys table writes it (`rms`, 1e-6, true, null) as the Python value it stands for."""
    text = text.strip().strip("`")
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def same_value(documented, default) -> bool:
    if isinstance(default, bool) or default is None or isinstance(documented, str):
        return documented == default
    return isinstance(default, (int, float)) and documented == pytest.approx(default, rel=1e-9)


# how the README's opening names each value of the spec's main choices ("a result in one framework holds ...")
README_NAMES = {
    "norm_type": {"rms": "RMSNorm", "layernorm": "LayerNorm", "dyt": "DynamicTanh", "derf": "DynamicErf"},
    "norm_placement": {"pre": "pre", "peri": "peri", "post": "post", "deepnorm": "DeepNorm", "hybrid": "HybridNorm",
                       "hybrid_star": "HybridNorm*", "pre_post": "pre_post"},
    "mixer": {"attention": "softmax attention", "gla": "Gated Linear Attention"},
    "routing": {"none": "dense blocks", "mod": "Mixture-of-Depths", "dtf": "DTF"},
    "position": {"rope": "RoPE", "learned": "learned", "none": "no positions"},
    "mlp": {"swiglu": "SwiGLU", "gelu": "GELU", "gelu_tanh": "GELU (exact or tanh)", "relu2": "ReLU²"},
}


def test_the_readme_opening_names_every_value_of_the_main_choices():
    """The README's first paragraph lists the architecture choices: a norm, placement, mixer, router, position or
    MLP added to the spec fails here until it is named there (it had no ReLU² MLP and no `position: none`)."""
    from shared_config.spec import CHOICES

    opening = " ".join((ROOT / "README.md").read_text().split("```")[0].split())
    for key, names in README_NAMES.items():
        assert set(names) == set(CHOICES[key]), (key, "add the new value's README name to README_NAMES")
        missing = [v for v, name in names.items() if name not in opening]
        assert not missing, (key, missing)


def test_every_documented_default_is_the_code_default():
    """The "values (default)" column of every keys table (spec.md, gla.md, routing.md, training.md) against the
    defaults of ModelSpec and TrainConfig (training.md's table and routing.md's `train:` rows): a default changed in
    the code and not in its row fails here. A row of several keys gives one default for all (`(0.5)`) or one per
    key in order (`(8, 1, 4)`); a default the code leaves unset (None: required, derived) is prose and skipped."""
    import dataclasses

    from shared_config.spec import ModelSpec
    from shared_config.train_config import TrainConfig

    def defaults(cls) -> dict:
        return {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}

    spec, train = defaults(ModelSpec), defaults(TrainConfig)
    wrong, checked = [], set()
    for page in PAGES[1:]:
        for cells in table_rows(page.read_text(), "key | values (default) | meaning"):
            table = train if page.name == "training.md" or cells[0].startswith("train:") else spec
            keys = re.findall(r"`(\w+)`", cells[0])
            assert keys and all(k in table for k in keys), (rel(page), cells[0])
            want = [table[k] for k in keys]
            if None in want and not (table is train and keys == ["compute_dtype"]):
                continue  # "(`n_heads`)", "(unset: true, except ...)"
            firsts = [g.split(";")[0] for g in re.findall(r"\(([^()]*)\)", cells[1])]  # "(1e-6; smaller is 0 ...)"
            groups = [[documented_value(v) for v in (f.split(",") if len(keys) > 1 else [f])] for f in firsts]
            if not any(len(g) == len(keys) and all(map(same_value, g, want)) or
                       len(g) == 1 and all(same_value(g[0], w) for w in want) for g in groups):
                wrong.append((rel(page), cells[0], cells[1], dict(zip(keys, want))))
            checked.update(keys)
    assert not wrong, wrong
    assert {"norm_eps", "norm_type", "lr", "warmup_steps", "gla_gate_rank", "dtf_window", "compute_dtype",
            "router_predictor_loss_weight"} <= checked, checked  # the parsing still finds the tables


def sci(x: float) -> str:
    """1e-05 as the docs write it: 1e-5."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def test_the_tolerance_table_quotes_the_bounds_the_tests_use():
    """docs/parity.md's Tolerances table and its parity report paragraph against the constants the tests and
    scripts/parity_report.py read (shared_config/parity.py, the sharded tests' and the finite-difference oracle's):
    each row, found by the start of its "what" cell, quotes each of its bounds."""
    import inspect

    from shared_config import parity as p

    from ..support import oracles, parallel_common

    fd_tol = inspect.signature(oracles.finite_difference_errors).parameters["tol"].default
    bounds = {  # the start of a row's "what" cell: the bounds its "bound" cell must quote
        "logits, JAX vs torch": [sci(p.FORWARD_TOL)],
        "imported Hugging Face model": [sci(p.FORWARD_TOL)],
        "cached decoding": [sci(p.FORWARD_TOL)],
        "a row of a left-padded ragged batch": [sci(p.FORWARD_TOL)],
        "greedy continuations": [sci(p.FORWARD_TOL)],
        "loss, JAX vs torch": [sci(p.LOSS_TOL)],
        "gradient of every canonical tensor": [sci(p.GRAD_TOL)],
        "gradients of both twins vs float64 central differences": [sci(fd_tol)],
        "100 AdamW steps": [sci(p.TRAJ_LOSS_TOL)],
        "... the final parameters": [sci(p.TRAJ_PARAM_TOL)],
        "sharded JAX": [sci(parallel_common.TOL), sci(parallel_common.GLA_STATE_TOL)],
        "a sharded run's checkpoint": [sci(p.FORWARD_TOL)],
        "bf16 compute: per-token KL": [sci(p.BF16_KL_MEAN), sci(p.BF16_KL_MAX)],
        "bf16 compute: top-1 agreement": [f"{p.BF16_TOP1:.0%}", sci(p.BF16_LOSS_TOL)],
        "bf16 compute: each twin's gradients": [sci(p.BF16_GRAD_TOL)],
        "bf16 compute, 5 AdamW steps": [sci(p.BF16_LOSS_TOL), sci(p.BF16_GRAD_TOL)],
    }
    text = (ROOT / "docs" / "parity.md").read_text()
    rows = [cells for cells in table_rows(text) if len(cells) == 3]
    wrong = []
    for start, quoted in bounds.items():
        matching = [cells for cells in rows if cells[0].startswith(start)]
        assert len(matching) == 1, (start, len(matching))
        wrong += [(start, q, matching[0][1]) for q in quoted if not re.search(rf"[≤≥] {re.escape(q)}(?![\d.])",
                                                                              matching[0][1])]
    assert not wrong, wrong
    report = " ".join(text.partition("## Parity report")[2].split())
    assert f"`FLOOR_FACTOR` ({p.FLOOR_FACTOR}, `shared_config/parity.py`)" in report
    assert f"`max|Δ| / max|x|` (≤ {sci(p.BF16_FORWARD_TOL)}) and gradients `≤ {sci(p.BF16_GRAD_TOL)}`" in report


def test_the_limits_the_docs_quote_are_the_code_constants():
    """Each number a page quotes from a code constant (the reading limits, temp names, the host devices a mesh may
    ask for, the compile cache's size, profile_step's steps, the GPU check's budget), at the phrase that quotes it."""
    from shared_config import cli, compile_cache, files, limits, parallel

    def constant(path: str, name: str):  # a bench module's constant, read without running its imports
        return int(re.search(rf"^{name} = (\d+)", (ROOT / path).read_text(), re.M).group(1))

    quoted = [  # (page, the phrase as the page writes it, with the constant in it)
        ("docs/checkpoints.md", f"over {limits.MAX_JSON_BYTES // 2**20} MiB"),
        ("docs/checkpoints.md", f"YAML over {limits.MAX_YAML_BYTES // 2**20} MiB"),
        ("docs/checkpoints.md", f"nested deeper than {limits.MAX_NESTING} levels"),
        ("docs/checkpoints.md", f"more than {limits.MAX_YAML_ALIASES} aliases"),
        ("docs/checkpoints.md", f"cut to about {limits.MAX_QUOTED} characters, an error line to {cli.MAX_MESSAGE:,}"),
        ("docs/checkpoints.md", f"NAME cut to {files.MAX_STEM} characters"),
        ("docs/training.md", f"host devices, at most {parallel.MAX_HOST_DEVICES})"),
        ("docs/bench.md", f"its size, at most {compile_cache.CACHE_SIZE_BYTES // 2**30} GiB)"),
        ("docs/bench.md", f"(`--steps`: at most {constant('bench/profile_step.py', 'MAX_STEPS')},"),
        ("docs/bench.md", f"at most the {constant('bench/gpu_plan.py', 'BUDGET_S')} s budget"),
        ("docs/bench.md", f"plans of at most {constant('bench/gpu_plan.py', 'BUDGET_S') // 60} minutes each"),
    ]
    missing = [(page, phrase) for page, phrase in quoted if phrase not in " ".join((ROOT / page).read_text().split())]
    assert not missing, missing


def test_the_corpus_figures_training_md_quotes():
    """The embedded corpus's entropy rate, a unigram model's loss (the stationary distribution's entropy) and
    uniform guessing's, as docs/training.md quotes them: each computed here from the chain."""
    import numpy as np

    from shared_config.corpus import entropy_rate, markov_chain, stationary, transition_matrix

    P = transition_matrix(*markov_chain(0))
    pi = stationary(P)
    phrase = (f"{entropy_rate(P):.4f} nats (perplexity {np.exp(entropy_rate(P)):.2f}) for seed 0, against "
              f"{-(pi @ np.log(pi)):.2f} for unigrams alone and {np.log(256):.2f} for uniform guessing")
    assert phrase in " ".join((ROOT / "docs" / "training.md").read_text().split()), phrase


def test_training_mds_llama_1b_memory_is_the_reports_peak():
    """training.md's "35 GB at batch 4" for llama-1b matched no figure the repository kept; it now quotes the peaks
    of the committed H200 report, in GiB as bench.md's table gives them."""
    import json

    report = json.loads((ROOT / "bench" / "results" / "h200-2026-11-22-llama1b-train-bf16.json").read_text())
    peaks = {r["backend"]: r["peak_mem_bytes"] / 2**30 for r in report["results"]}
    phrase = (f"llama-1b at seq 2048 and batch 4 peaked at {peaks['jax']:.1f} GiB (JAX) and {peaks['torch']:.1f} GiB "
              "(torch) in bfloat16 on an H200, 2026-11-22")
    assert phrase in " ".join((ROOT / "docs" / "training.md").read_text().split()), phrase


def test_the_routing_study_table_quotes_its_report():
    """routing.md's study table, rendered from the committed report (three seeds) by the study's own markdown: a
    table re-measured or edited by hand without its report, or the other way round, fails here."""
    import json

    study = load_script("compare_routing")
    report = json.loads((ROOT / "bench" / "results" / "cpu-2vcpu-2026-12-07-tiny-routing-study-seeds.json").read_text())
    text = (ROOT / "docs" / "routing.md").read_text()
    section = text[text.index("## Study"):text.index("## Not done")]
    table = study.markdown(report["results"], report["backends"], report["steps"], report["command"])
    rows = [line for line in table.splitlines() if line.startswith(("| dense |", "| mod-", "| dtf-"))]
    assert len(rows) == 8 and all(row in section for row in rows)
    assert section.count("\n| ") == 1 + len(rows)  # the header, nothing else in its table
    assert report["seeds"] == [0, 1, 2] and report["command"].split(" --out ")[0] in " ".join(section.split())


@pytest.mark.parametrize("page, start, end, reports", [
    ("norm-study.md", "## Across seeds", "## Placements from the literature", ["tiny-norms-seeds"]),
    ("gla.md", "## The study: DyT in a GLA model", "## Decode cost against context",
     ["gla-tiny-norms-seeds", "gla-tiny-norms-seeds-final-alpha-2"])])
def test_the_norm_studies_across_seeds_quote_their_reports(page, start, end, reports):
    """The norm studies' tables over three seeds, rendered from the committed reports by the study's own markdown
    (their rows) and the criteria each report holds: a table re-measured or edited by hand without its report, or
    the other way round, fails here (the first table's reading a second seed overturned rested on one seed)."""
    import json

    study = load_script("compare_norms")
    text = (ROOT / "docs" / page).read_text()
    section = text[text.index(start):text.index(end)]
    lines = 0
    for name in reports:
        report = json.loads((ROOT / "bench" / "results" / f"cpu-2vcpu-2026-12-07-{name}.json").read_text())
        table = study.markdown(report["results"], report["backends"], report["steps"], report["command"])
        rows = [line for line in table.splitlines() if line.startswith(("| rms |", "| dyt |", "| derf |"))]
        assert len(rows) == 4 and all(row in section for row in rows)
        for c in report["criteria"]:
            result = "—" if c["passed"] is None else "PASS" if c["passed"] else "FAIL"
            assert f"| {c['criterion']} | {result} | {c['detail']} |" in section
        assert report["seeds"] == [0, 1, 2] and report["command"].split(" --out ")[0] in section
        lines += 1 + len(rows) + 1 + len(report["criteria"])  # two headers
    assert section.count("\n| ") == lines  # nothing else in its tables


def test_the_gla_studys_prose_on_each_seed_holds_in_its_report():
    """gla.md said Pre-LN had the lowest gradient-norm variance "in both norms in every seed": RMSNorm's seed 2 has
    peri lower. What it says per seed now is read from the report."""
    import json

    text = (ROOT / "docs" / "gla.md").read_text()
    rows = json.loads((ROOT / "bench" / "results" / "cpu-2vcpu-2026-12-07-gla-tiny-norms-seeds.json").read_text())
    var = {c: {s: r["grad_norm_var"] for s, r in by["jax"]["seeds"].items()} for c, by in rows["results"].items()}
    assert all(var["dyt-pre"][s] < var["dyt-peri"][s] for s in "012")
    assert "lowest for Pre-LN in every seed for DyT" in text
    lower = [s for s in "012" if var["rms-peri"][s] < var["rms-pre"][s]]
    assert lower == ["2"]
    assert f"seed 2 has peri {var['rms-peri']['2']:.3f} against pre's {var['rms-pre']['2']:.3f}" in text


def test_norm_study_md_says_how_the_output_criterion_reads_the_seeds():
    """It said "the seeds' mean histograms"; the study compares each seed's run with RMSNorm's of the same seed and
    averages the distances (output_criteria: a distance between mean histograms reads lower, TV being convex)."""
    text = " ".join((ROOT / "docs" / "norm-study.md").read_text().split())
    assert "mean histograms" not in text
    assert "the output criterion: each seed's run against RMSNorm's of the same seed, the distances averaged" in text


def test_checkpoints_mds_layout_table_names_every_canonical_tensor():
    """docs/checkpoints.md calls its name table the canonical layout: every tensor `layout(spec)` gives, over specs
    that hold every option (test_layout's SPECS, which a new mixer or norm type must join, and each router), matches
    one of its rows, and each row matches some tensor (no row outlives its tensor)."""
    from shared_config import layout
    from shared_config.spec import CHOICES

    from ..spec.test_layout import SPECS
    from ..support.common import make_spec

    def pattern(cell: str) -> str:  # `{i}` a layer index, `{a,b}` one of the words, `.*` a norm slot's tensors
        name = re.escape(cell.strip("`")).replace(r"\{i\}", r"\d+").replace(r"\.\*", r"\.(alpha|shift|weight|bias)")
        return re.sub(r"\\\{([\w,]+)\\\}", lambda m: "(" + m[1].replace(",", "|") + ")", name)

    table = table_rows((ROOT / "docs/checkpoints.md").read_text(), "name | shape")
    rows = {cells[0]: pattern(cells[0]) for cells in table}
    routers = [{"routing": r, "routing_capacity": 0.5} for r in CHOICES["routing"] if r != "none"]
    names = {t.name for changes in [*SPECS.values(), *routers] for t in layout(make_spec(**changes))}
    unmatched = sorted(n for n in names if not any(re.fullmatch(r, n) for r in rows.values()))
    assert not unmatched, f"docs/checkpoints.md's layout table has no row for {unmatched}"
    stale = [cell for cell, r in rows.items() if not any(re.fullmatch(r, n) for n in names)]
    assert not stale, f"docs/checkpoints.md's layout table rows {stale} name no tensor"


def test_the_docs_lists_of_norm_classes_and_gla_placements_are_the_codes():
    """Two hand-written lists a new norm or placement must join: the norm classes `layers.py`'s row of
    docs/architecture.md names (each class `make_norm` builds), and the placements GLA takes, as gla.md's rules and
    the spec's error name them (each placement `check_gla_rules` accepts, and no other)."""
    from jax_model.layers import make_norm
    from shared_config.spec import CHOICES, SpecError

    from ..support.common import MIXERS, make_spec

    row = next(cells for cells in table_rows((ROOT / "docs/architecture.md").read_text()) if cells[0] == "`layers.py`")
    classes = {type(make_norm(make_spec(norm_type=n))).__name__ for n in CHOICES["norm_type"]}
    assert {c for c in classes if not re.search(rf"\b{c}\b", row[1])} == set(), row
    taken, refused = set(), ""
    for placement in CHOICES["norm_placement"]:
        try:
            make_spec(**MIXERS["gla"], norm_placement=placement)
            taken.add(placement)
        except SpecError as e:
            refused = str(e)
    said = re.search(r"a `norm_placement` of (.*?) \(", (ROOT / "docs/gla.md").read_text(), re.S)[1]
    assert set(re.findall(r"`(\w+)`", said)) == taken, said
    assert set(re.findall(r"\b\w+\b", refused.split(" takes ")[1])) - {"or"} == taken, refused
