"""The README and docs/ against the checkout, statically (nothing is run): the README stays a front door (at most
12 KiB, the two opening commands as CI runs them), every relative link reaches a file (and a heading, for a
`#anchor`), every file named in a page or in the code exists, every test function and dotted name
(`shared_config.files.recover`) a page names exists, the architecture map names every module, every preset is named,
and .ci/walkthrough walks every page. The pages' command lines: test_docs_commands.py; the values they quote:
test_docs_values.py."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from ..support.common import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
OPENING = [  # the README's two opening commands, byte for byte: the main job, then the tests (.ci/run runs the latter)
    "pip install -c .ci/constraints.txt -e . && python bench/compare.py --backend both",
    'pip install -c .ci/constraints.txt -e ".[test]" && pytest parity_tests -n 2 --dist loadscope',
]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(README.read_bytes()) <= 12 * 1024, f"README.md is {len(README.read_bytes())} bytes; move detail to docs/"
    first_block = FENCE.search(text).group(2)
    assert [line for line in first_block.splitlines() if line and not line.startswith("#")] == OPENING
    assert "pytest parity_tests -n 2 --dist loadscope" in (ROOT / ".ci" / "run").read_text()  # CI runs the second


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
