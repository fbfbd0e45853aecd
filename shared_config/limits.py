"""Bounds on what the project reads from files a user hands it (stdlib only, so every module may import it).

Text files read whole (JSON, YAML) are capped in size, their nesting is bounded, YAML aliases are
counted, and any value quoted in an error message is shortened. Each limit is far above what a real
file holds, and low enough that a hostile file is refused in about the time a normal start-up takes.
docs/checkpoints.md, "Bad input, limits and failures", lists them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import reprlib
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

MAX_JSON_BYTES = 64 * 2**20  # config.json, a shard index, state.json, spec.json, meta.json, a metrics.jsonl line
MAX_YAML_BYTES = 1 * 2**20  # a spec or train config: a flat mapping of a few dozen keys
MAX_NESTING = 64  # JSON/YAML containers inside containers (real files nest 3 deep)
MAX_YAML_ALIASES = 100  # `*name` references in one YAML document ("billion laughs" expands them exponentially)
MAX_QUOTED = 80  # characters of a value quoted in an error message
MAX_DIGITS = 24  # digits of a number quoted whole in an error message (2**64 has 20); longer ones are cut
LONG_NUMBER = re.compile(rf"[0-9]{{{MAX_DIGITS + 1},}}")
MAX_NAME_DIGITS = 64  # digits kept whole inside a name or path (`run-20261206194600123456789012/spec.yaml`)
# a run's neighbours in a name or path: a letter, `_`, `/` or `\\` beside it, or beyond a `-`, `.` or `+` beside it
NAME_BEFORE, NAME_AFTER = re.compile(r"[A-Za-z_/\\][-.+]?\Z"), re.compile(r"[-.+]?[A-Za-z_/\\]")


def shorten_numbers(text: str) -> str:
    """`text` with each run of more than MAX_DIGITS digits cut to its first and last ten and its length,
    `1234567890...1234567890 (400 digits)`: the one rule for long numbers in error messages, applied by `quote`, by
    every SpecError and by `cli.fail` to every error line (a 400-digit `--set` value was echoed whole). A run of at
    most MAX_NAME_DIGITS inside a name or path (NAME_BEFORE, NAME_AFTER) stays whole: the line names the file as it
    is (`run-2026120619...6789012345 (29 digits)/spec.yaml` named none)."""

    def cut(m: re.Match) -> str:
        named = (NAME_BEFORE.search(text, max(0, m.start() - 2), m.start())
                 or NAME_AFTER.match(text, m.end()))
        if named and len(m[0]) <= MAX_NAME_DIGITS:
            return m[0]
        return f"{m[0][:10]}...{m[0][-10:]} ({len(m[0]):,} digits)"

    return LONG_NUMBER.sub(cut, text)


class _Quoter(reprlib.Repr):
    """reprlib's shortened repr, with long numbers cut by `shorten_numbers` (also inside strings, before reprlib cuts
    them, so that the digit count is the whole run's) and integers too long for `repr` named by their size. None and
    the booleans are spelled as YAML and JSON spell them, `null`, `true`, `false` (also inside lists and mappings):
    the values quoted come from files and --set items, where a user typed `null`, not Python's `None`."""

    def repr_NoneType(self, x: None, level: int) -> str:
        return "null"

    def repr_bool(self, x: bool, level: int) -> str:  # numpy 2's bool_ too (its type's name is "bool")
        return "true" if x else "false"

    repr_bool_ = repr_bool  # numpy 1's bool_

    def repr_int(self, x: int, level: int) -> str:
        try:
            return shorten_numbers(repr(x))
        except ValueError:  # past sys.get_int_max_str_digits() digits
            return f"<an integer of about {x.bit_length() * math.log10(2):,.0f} digits>"

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(shorten_numbers(x) if len(x) > MAX_DIGITS else x, level)


_repr = _Quoter()
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_QUOTED
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


class LimitError(ValueError):
    """A file or value past one of the limits above; the message names the file, the limit and what was found."""


def quote(value: Any) -> str:
    """`repr(value)` shortened to about MAX_QUOTED characters (numbers past MAX_DIGITS digits by `shorten_numbers`),
    without walking more of `value` than it shows; None, True and False as `null`, `true` and `false`."""
    return _repr.repr(value)


def spelled(value) -> str:
    """A value as a spec file, a `--set key=value` item or a list option spells it in a message: `true`, `false`,
    `null`, text and numbers as typed, unquoted and whole (`quote(spelled(x))[1:-1]` shortens it like `quote`).
    Python's True named an option the user sets as `embed_norm=false`. An int past Python's 4,300 digits, which `str`
    refuses (ValueError), is named by its size as `quote` names it."""
    if type(value) is int and value.bit_length() > 14_000:  # 4,214 digits at most: below str's limit
        return quote(value)
    return "null" if value is None else ("true" if value else "false") if isinstance(value, bool) else str(value)


SPECIAL_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                 stat.S_IFSOCK: "a socket"}


def open_regular(path: str | Path, what: str = "file"):
    """`open(path, "rb")` of a regular file; anything else where a file is expected (a FIFO, a device, a socket)
    is a LimitError naming it, found without blocking: the open does not wait for a FIFO's writer, and nothing
    is read. A directory is an IsADirectoryError, as from `open`."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "not a regular file")
            raise LimitError(f"{path}: is {kind}, not a regular {what}; pass a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file (`open_regular`) that is read whole, refused (LimitError) past `limit` bytes
    before any is read."""
    path = Path(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise LimitError(f"{path}: the {what} is {size:,} bytes, over the {limit:,}-byte limit")
        data = f.read(size + 1)  # read(n) allocates n bytes first; a file that grew meanwhile is caught below
    if len(data) > limit:
        raise LimitError(f"{path}: the {what} is over the {limit:,}-byte limit")
    return data


def parse_json(text: str | bytes, where: str | Path | None = None) -> Any:
    """`json.loads` with nesting bounded (MAX_NESTING); errors are ValueErrors ("WHERE: not valid JSON: ...", or
    the parser's message alone without `where`), a LimitError past the nesting bound, never a RecursionError."""
    prefix = f"{where}: " if where is not None else ""
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text,  # UTF-8 only, not JSON's guess
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise LimitError(f"{prefix}JSON nested deeper than {MAX_NESTING} levels") from None
    except LimitError as e:  # a key given twice: valid JSON, refused as such (read_metrics took it for a cut line)
        raise LimitError(f"{prefix}{e}") from None
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise ValueError(f"{prefix}not valid JSON: {e}" if prefix else str(e)) from None
    if depth(data) > MAX_NESTING:
        raise LimitError(f"{prefix}JSON nested deeper than {MAX_NESTING} levels")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing a key given twice: json keeps the last silently, so an edited
    config.json with `"hidden_size"` twice would build a model of the other size."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise LimitError(f"duplicate key {quote(key)} (which value is meant?)")
    return d


def depth(x: Any, limit: int = MAX_NESTING) -> int:
    """Nesting depth of lists/dicts in `x`, counted without recursion and stopping once past `limit`."""
    deepest, stack = 0, [(x, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses documents nested deeper than MAX_NESTING or with more than MAX_YAML_ALIASES
    aliases, as it composes them (before any structure is built), and a mapping that gives a key twice (PyYAML keeps
    the last silently: a spec with `d_model` twice built the other model)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._aliases = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise LimitError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name)")
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise LimitError(f"YAML nested deeper than {MAX_NESTING} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            # a key is read as written, text: every mapping read here is a config of named keys, where `true:`,
            # `null:` or `0x10:` is an unknown key, named as the file spells it (it was Python's 'True', 'None', '16')
            node.value = [(as_text(key_node), value_node) for key_node, value_node in node.value]
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it, by design
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {quote(key)} (line {key_node.start_mark.line + 1}): "
                                    "which value is meant?", key_node.start_mark)
        return super().construct_mapping(node, deep)

    def flatten_mapping(self, node):
        """`<<` merges, their keys read as written too (as construct_mapping reads the mapping's own): merged after
        that, `<<: {null: 3}` was "unknown spec key 'None'"."""
        super().flatten_mapping(node)
        node.value = [(as_text(key_node), value_node) for key_node, value_node in node.value]

    def construct_object(self, node, deep=False):
        """A value its explicit tag cannot read (`--set 'd_model=!!int 96.0'`, `!!float abc`, `!!bool maybe`) is a
        ConstructorError naming the tag and the value: it was the constructor's ValueError, KeyError or
        AttributeError, a traceback where every caller turns YAML errors into one line."""
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, LimitError):
            raise
        except (ValueError, LookupError, AttributeError, TypeError):
            tag = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(None, None, f"{quote(node.value)} cannot be read as !!{tag}",
                                                    node.start_mark) from None

    def construct_yaml_null(self, node):
        """A null of YAML 1.2's forms: SafeLoader's `!!null 4` was None whatever the text (`--set 'n_kv_heads=!!null
        4'` left the field unset)."""
        if not YAML12_NULL.match(self.construct_scalar(node)):
            raise ValueError(node.value)
        return None

    def construct_yaml_bool(self, node):
        return read_bool(self.construct_scalar(node))

    def construct_yaml_int(self, node):
        return read_int(self.construct_scalar(node))

    def construct_yaml_float(self, node):
        return read_float(self.construct_scalar(node))


def as_text(node: yaml.Node) -> yaml.Node:
    """A scalar that YAML reads as null, a boolean or a number (`!!int 7` too), as the string it is written as; other
    nodes (a string, a quoted scalar, a merge key `<<`, a list) as they are."""
    if isinstance(node, yaml.ScalarNode) and node.tag in _PLAIN_TAGS and node.style is None:
        return yaml.ScalarNode(f"{_TAG}str", node.value, node.start_mark, node.end_mark)
    return node


# YAML 1.2's core schema (yaml.org/spec/1.2.2, 10.3.2), where PyYAML reads YAML 1.1: every YAML read here (--set,
# --sweep, spec and train config files) resolves plain scalars by these patterns, and an explicit tag (`!!int 0o17`)
# reads only these forms. YAML 1.1 differed in ways that misread a spec without a word: `yes`/`no`/`on`/`off` were
# booleans (`--set norm_type=off` was refused as False, `tie_embeddings: yes` tied), `1e-3` and `+.5` text (a
# study's JSON recorded `"lr": "1e30"`), `010` octal 8 and `1:30` base-60 90 (`--set steps=1:30` ran 90 steps),
# `1_000` and `0b11` numbers, `2024-01-01` a date, `=` an unreadable tag. In YAML 1.2 all those are text, which a
# number, boolean or enum field refuses naming the field.
YAML12_NULL = re.compile(r"^(?:null|Null|NULL|~|)\Z")  # SafeLoader's implicit resolver matches these too
YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)\Z")
YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z")
YAML12_FLOAT = re.compile(r"^(?:[-+]?(?:[.][0-9]+|[0-9]+(?:[.][0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                          r"|[-+]?[.](?:inf|Inf|INF)|[.](?:nan|NaN|NAN))\Z")
_TAG = "tag:yaml.org,2002:"
_YAML11_ONLY = {f"{_TAG}{kind}" for kind in ("bool", "int", "float", "timestamp", "value")}
_PLAIN_TAGS = {f"{_TAG}{kind}" for kind in ("null", "bool", "int", "float")}


def read_bool(text: str) -> bool:
    """A YAML 1.2 boolean (true/True/TRUE, false/False/FALSE); ValueError for anything else (YAML 1.1's `yes`)."""
    if not YAML12_BOOL.match(text):
        raise ValueError(text)
    return text[0] in "tT"


def read_int(text: str) -> int:
    """A YAML 1.2 integer: decimal with an optional sign (`010` is ten), `0o17` octal, `0x1f` hexadecimal; ValueError
    for anything else, and for more digits than Python turns into an int (a message then says so)."""
    if not YAML12_INT.match(text):
        raise ValueError(text)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    if base == 10 and 0 < sys.get_int_max_str_digits() < len(text.lstrip("+-")):  # int()'s ValueError said less
        limit = sys.get_int_max_str_digits()
        raise yaml.constructor.ConstructorError(None, None, f"{quote(text)} has more digits than the {limit:,} Python "
                                                            "reads as an integer")
    return int(text if base == 10 else text[2:], base)


def read_float(text: str) -> float:
    """A YAML 1.2 float (`1e-3`, `.5`, `+.5`, `1.`, `-.inf`, `.nan`), integers included; ValueError for anything
    else."""
    if not YAML12_FLOAT.match(text):
        raise ValueError(text)
    special = text.lstrip("+-").lower() in (".inf", ".nan")  # Python's float() reads them without the dot
    return float(text.replace(".", "", 1) if special else text)


def yaml_number(text: str) -> int | float | None:
    """The number `text` is as a plain YAML scalar (as `--set key=TEXT` reads it), or None where YAML reads text: how
    a float field reads a string given in Python (`{"lr": "1e-3"}`) or recorded before YAML 1.2's floats were read."""
    if YAML12_INT.match(text):
        try:
            return read_int(text)
        except yaml.YAMLError:  # past Python's digits, and past every float: no number a field takes
            return None
    return read_float(text) if YAML12_FLOAT.match(text) else None


# BoundedLoader's own table of resolvers: SafeLoader's (nulls, `<<` merge keys) less YAML 1.1's, in new lists, so
# that yaml.SafeLoader (and yaml.safe_load) keep reading YAML 1.1 (add_implicit_resolver copies only the dict)
BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
BoundedLoader.add_implicit_resolver(f"{_TAG}bool", YAML12_BOOL, list("tTfF"))
BoundedLoader.add_implicit_resolver(f"{_TAG}int", YAML12_INT, list("-+0123456789"))
BoundedLoader.add_implicit_resolver(f"{_TAG}float", YAML12_FLOAT, list("-+0123456789."))
for _kind in ("null", "bool", "int", "float"):
    BoundedLoader.add_constructor(f"{_TAG}{_kind}", getattr(BoundedLoader, f"construct_yaml_{_kind}"))


def parse_yaml(text: str | bytes) -> Any:
    """`yaml.safe_load` within the limits above (LimitError past them; yaml.YAMLError for bad YAML), reading plain
    scalars by YAML 1.2's core schema (the patterns above), not YAML 1.1's."""
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
