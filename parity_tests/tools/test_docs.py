"""The README and docs/ against the checkout, statically (nothing is run): the README stays a front door (at most
12 KiB, the two opening commands as CI runs them), every `python scripts/X.py` / `python bench/X.py` command line of a
```bash or ```console block (or of a sentence's code span) names a script that exists and options its parser accepts,
every ```python block compiles, every relative link reaches a file (and a heading, for a `#anchor`), every file
named in a page or in the code exists, every test function and dotted name (`shared_config.files.recover`) a page
names exists, the architecture map names every module, every preset is named, and .ci/walkthrough walks every page."""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

from ..support.common import ROOT
from .test_new_user_cli import parser_of

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
OPENING = [  # the README's two opening commands, byte for byte: the main job, then the tests (.ci/run runs the latter)
    "pip install -c .ci/constraints.txt -e . && python bench/compare.py --backend both",
    'pip install -c .ci/constraints.txt -e ".[test]" && pytest parity_tests -n 2 --dist loadscope',
]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
SCRIPT = re.compile(r"(scripts|bench)/[\w.-]+\.py")
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
KEYWORDS = {"do", "then", "else", "time", "!"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shell_lines(text: str) -> list[str]:
    """The command lines of a page's ```bash and ```console blocks, continuation lines joined (`$ ` prompts cut)."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "console", "sh", "shell"):
            continue
        joined = re.sub(r"\\\n", " ", body)
        for line in joined.splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output, not a command
                line = line[2:]
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """A shell line split into its simple commands (at ; && || | and the like), comments and env assignments cut."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    out = []
    for words in commands:
        while words and (words[0] in KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0])):
            words = words[1:]
        if words:
            out.append(words)
    return out


def inline_commands(text: str) -> list[str]:
    """`python scripts/X.py ...` or `bench/X.py --option ...` written in a sentence (a code span, perhaps over a line
    break), not in a block; a usage line (`[--option]`) is test_every_usage_line_lists_exactly_its_scripts_options'."""
    spans = re.findall(r"`((?:python3? )?(?:scripts|bench)/[\w.-]+\.py [^`]+)`", FENCE.sub("", text))
    return [" ".join(span.split()) for span in spans if "[--" not in span]


def script_calls() -> list[tuple[str, str, list[str]]]:
    """(page, script path, its options) for every python/torchrun call of a script in scripts/ or bench/, in a block
    or in a sentence."""
    calls = []
    for page in PAGES:
        text = page.read_text()
        for line in shell_lines(text) + inline_commands(text):
            for words in simple_commands(line):
                if Path(words[0]).name not in ("python", "python3", "torchrun") and not SCRIPT.fullmatch(words[0]):
                    continue
                scripts = [i for i, w in enumerate(words) if SCRIPT.fullmatch(w)]
                if scripts:
                    i = scripts[0]
                    options = [w.split("=", 1)[0] for w in words[i + 1:] if w.startswith("--")]
                    calls.append((rel(page), words[i], options))
    return calls


CALLS = script_calls()


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(README.read_bytes()) <= 12 * 1024, f"README.md is {len(README.read_bytes())} bytes; move detail to docs/"
    first_block = FENCE.search(text).group(2)
    assert [line for line in first_block.splitlines() if line and not line.startswith("#")] == OPENING
    assert "pytest parity_tests -n 2 --dist loadscope" in (ROOT / ".ci" / "run").read_text()  # CI runs the second


def test_the_docs_name_commands_at_all():
    """The extraction still finds the commands (a changed fence or prompt style would silently check nothing)."""
    scripts = {script for _, script, _ in CALLS}
    assert {"bench/compare.py", "scripts/train.py", "scripts/convert.py", "scripts/generate.py"} <= scripts, scripts
    assert ("docs/training.md", "scripts/train.py", ["--backend", "--parallel", "--out"]) in CALLS  # a torchrun line
    # inline, with python and without
    assert ("docs/routing.md", "scripts/compare_routing.py", ["--steps", "--backends", "--set", "--out"]) in CALLS
    assert ("docs/gla.md", "bench/gla_layer.py", ["--compile-step", "--batch", "--tokens"]) in CALLS


@pytest.mark.parametrize("script", sorted({script for _, script, _ in CALLS}))
def test_every_documented_command_line_parses(script, monkeypatch):
    """Each script a page runs exists, and each --option a page passes it is one its parser knows (exactly, not
    as an abbreviation argparse would also take)."""
    path = ROOT / script
    pages = sorted({page for page, s, _ in CALLS if s == script})
    assert path.is_file(), f"{script}, run in {pages}, does not exist"
    known = parser_of(path, monkeypatch)._option_string_actions
    unknown = sorted({(page, option) for page, s, options in CALLS if s == script
                      for option in options if option not in known})
    assert not unknown, f"{script} has no option: {unknown}"


def test_every_extra_the_docs_install_exists():
    """`pip install -e '.[gla]'` and the like: each extra named in the docs or in an error message is declared."""
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", (ROOT / "pyproject.toml").read_text(),
                        re.S | re.M).group(1)
    declared = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    sources = PAGES + [p for d in ("shared_config", "jax_model", "torch_model", "bench", "scripts")
                       for p in sorted((ROOT / d).glob("*.py"))]
    named = {(rel(p), extra) for p in sources for group in re.findall(r"\.\[([\w,-]+)\]", p.read_text())
             for extra in group.split(",")}
    assert {extra for _, extra in named} >= {"gla", "hf", "test"}, named  # the pattern still finds them
    assert not [(page, extra) for page, extra in named if extra not in declared], declared


def test_every_python_block_compiles():
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang == "python":
                compile(body, rel(page), "exec")  # a SyntaxError names the page


def test_the_shell_scripts_the_docs_run_exist():
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            for words in simple_commands(line):
                if words[0] == "bash" and len(words) > 1:
                    assert (ROOT / words[1]).is_file(), (rel(page), words[1])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup cut, lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_every_relative_link_reaches_its_file_and_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append((rel(page), target, "no such file"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append((rel(page), target, "no such heading"))
    assert not broken, broken


def test_every_source_file_the_docs_and_code_name_exists():
    """`bench/gla_layer.py`, `docs/gla.md`, ... named in a page, a docstring or a comment: a renamed or deleted file
    leaves no stale name (an all-capitals stem, `X.py`, stands for any file)."""
    code = [p for d in ("shared_config", "jax_model", "torch_model", "bench", "scripts", "parity_tests", ".ci")
            for p in sorted((ROOT / d).rglob("*")) if p.is_file() and p.suffix in ("", ".py", ".sh")]
    missing = []
    for page in PAGES + code:
        for name in re.findall(r"(?<![\w/.-])((?:bench|scripts|jax_model|torch_model|shared_config|parity_tests|docs)"
                               r"/[\w/]+\.(?:py|md|yaml|sh))", page.read_text(errors="replace")):
            if not re.fullmatch(r"[A-Z]+", Path(name).stem) and not (ROOT / name).is_file():
                missing.append((rel(page), name))
    assert not missing, missing


def test_every_test_a_page_names_exists():
    """`test_norm_slots_hold_the_parameters_of_their_type` and the like, named in a page as the test that says a
    step is done: each is a test function of parity_tests/ (`*` stands for any part of the name)."""
    import fnmatch

    defined = {name for p in sorted((ROOT / "parity_tests").rglob("test_*.py"))
               for name in re.findall(r"^\s*def (test_\w+)", p.read_text(), re.M)}
    named = {(rel(page), name) for page in PAGES for name in re.findall(r"`(test_[\w*]+)`", page.read_text())}
    assert {"test_norm", "test_the_cases_hold_*"} <= {name for _, name in named}  # the pattern still finds them
    assert not [(page, name) for page, name in sorted(named) if not fnmatch.filter(defined, name)]


def is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # `torch_model.generate.generate`: a function, inside a module that is no package
        return False


def test_every_dotted_name_a_page_gives_resolves():
    """`shared_config.files.recover`, `torch_model.distributed.exit_rank`,
    `shared_config/hardware.py::resolve_gla_kernel`, written in a page's code span: each names a module and what it
    defines."""
    import importlib

    unresolved, found = [], 0
    for page in PAGES:
        for span in re.findall(r"`([^`]+)`", page.read_text()):
            for dotted in re.findall(r"(?<![\w./])((?:shared_config|jax_model|torch_model)(?:\.\w+)+)(?![\w/])", span):
                parts, found = dotted.split("."), found + 1
                i = next(i for i in range(len(parts), 0, -1) if is_module(".".join(parts[:i])))
                obj = importlib.import_module(".".join(parts[:i]))
                for name in parts[i:]:
                    obj = getattr(obj, name, unresolved)  # the list itself: a sentinel no attribute is
                unresolved += [(rel(page), dotted)] if obj is unresolved else []
            for path, name in re.findall(r"([\w/]+\.py)::(\w+)", span):
                found += 1
                if not re.search(rf"^(def|class) {name}\b|^{name} =", (ROOT / path).read_text(), re.M):
                    unresolved.append((rel(page), f"{path}::{name}"))
    assert found >= 15, found  # the pattern still finds them
    assert not unresolved, unresolved


def test_the_map_names_every_module():
    """docs/architecture.md names every module of the core, the twins, scripts/ and bench/ (`layout.py`,
    `gpu_plan.py`, ...): a file added without its line in the map fails here."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w.-]+\.(?:py|sh))`", text))
    folders = ("shared_config", "shared_config/formats", "jax_model", "torch_model", "scripts", "bench")
    files = [p for d in folders for p in sorted((ROOT / d).glob("*")) if p.suffix in (".py", ".sh")]
    assert not [rel(p) for p in files if p.name != "__init__.py" and p.name not in named]


def test_every_preset_is_named_in_the_docs():
    """Each spec preset (shared_config/specs/) and train preset (shared_config/train/) appears as `name` in a page."""
    from shared_config import preset_names, train_preset_names

    named = {name for page in PAGES for name in re.findall(r"`([\w.-]+)`", page.read_text())}
    assert not sorted(set(preset_names() + train_preset_names()) - named)


def test_the_walkthrough_walks_every_page():
    text = (ROOT / ".ci" / "walkthrough").read_text()
    listed = re.search(r"^PAGES=\((.*?)\)", text, re.S | re.M).group(1).split()
    assert sorted(listed) == sorted(rel(page) for page in PAGES), listed
    assert listed[0] == "README.md" and len(set(listed)) == len(listed)
    assert "walkthrough" not in (ROOT / ".ci" / "run").read_text()  # too slow for CI: the lead runs it


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


def synopses() -> list[tuple[str, str, str]]:
    """(page, script, text) of every usage line a page writes as a code span: `scripts/X.py ... [--option ...]`."""
    out = []
    for page in PAGES:
        for span in re.findall(r"`((?:scripts|bench)/[\w.-]+\.py [^`]*\[--[^`]*)`", FENCE.sub("", page.read_text())):
            script, _, rest = " ".join(span.split()).partition(" ")
            out.append((rel(page), script, rest))
    return out


def test_every_usage_line_lists_exactly_its_scripts_options(monkeypatch):
    """A usage line in the docs (train.py's, convert.py's) names every option of the script's parser and no other,
    each `--option a|b|c` with the parser's choices: an option or a choice added to the code fails here until its
    page lists it."""
    found = synopses()
    assert {script for _, script, _ in found} >= {"scripts/train.py", "scripts/convert.py"}, found
    for page, script, text in found:
        parser = parser_of(ROOT / script, monkeypatch)
        named = re.findall(r"(--[\w-]+)(?: ([\w.]+(?:\|[\w.]+)+))?", text)
        known = parser._option_string_actions
        assert not [o for o, _ in named if o not in known], (page, script, "no such option")
        actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        missing = [a.option_strings[0] for a in actions if not set(a.option_strings) & {o for o, _ in named}]
        assert not missing, f"{page}: the usage line of {script} leaves out {missing}"
        for option, choices in named:
            action = known[option]
            if choices and action.choices is not None:
                assert choices.split("|") == list(action.choices), (page, option, choices, action.choices)


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
