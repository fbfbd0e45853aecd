"""The command lines of the README and docs/, statically (nothing is run): every `python scripts/X.py` /
`python bench/X.py` command line of a ```bash or ```console block (or of a sentence's code span) names a script that
exists and options its parser accepts, every usage line lists exactly its script's options, every extra the docs
install is declared, every ```python block compiles, every shell script the docs run exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ..support.common import ROOT
from .test_docs import FENCE, PAGES, rel
from .test_new_user_cli import parser_of

SCRIPT = re.compile(r"(scripts|bench)/[\w.-]+\.py")
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
KEYWORDS = {"do", "then", "else", "time", "!"}


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


def test_the_docs_name_commands_at_all():
    """The extraction still finds the commands (a changed fence or prompt style would silently check nothing)."""
    scripts = {script for _, script, _ in CALLS}
    assert {"bench/compare.py", "scripts/train.py", "scripts/convert.py", "scripts/generate.py"} <= scripts, scripts
    assert ("docs/training.md", "scripts/train.py", ["--backend", "--parallel", "--out"]) in CALLS  # a torchrun line
    # inline, with python and without
    assert ("docs/routing.md", "scripts/compare_routing.py", ["--steps", "--backends", "--set", "--seeds",
                                                              "--out"]) in CALLS
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
