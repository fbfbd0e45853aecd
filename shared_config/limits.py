"""Bounds on what the project reads from files a user hands it (stdlib only, so every module may import it).

Text files read whole (JSON, YAML) are capped in size, their nesting is bounded, YAML aliases are
counted, and any value quoted in an error message is shortened. Each limit is far above what a real
file holds, and low enough that a hostile file is refused in about the time a normal start-up takes.
docs/checkpoints.md, "Bad input, limits and failures", lists them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_JSON_BYTES = 64 * 2**20  # config.json, a shard index, state.json, spec.json, meta.json, a metrics.jsonl line
MAX_YAML_BYTES = 1 * 2**20  # a spec or train config: a flat mapping of a few dozen keys
MAX_NESTING = 64  # JSON/YAML containers inside containers (real files nest 3 deep)
MAX_YAML_ALIASES = 100  # `*name` references in one YAML document ("billion laughs" expands them exponentially)
MAX_QUOTED = 80  # characters of a value quoted in an error message

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_QUOTED
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


class LimitError(ValueError):
    """A file or value past one of the limits above; the message names the file, the limit and what was found."""


def quote(value: Any) -> str:
    """`repr(value)` shortened to about MAX_QUOTED characters, without walking more of `value` than it shows."""
    return _repr.repr(value)


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
        raise ValueError(f"duplicate key {quote(key)} (which value is meant?)")
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

    def construct_yaml_int(self, node):
        """YAML 1.2's integers: `010` is ten, where YAML 1.1 read octal (8: `--set n_layers=010` built 8 layers, while
        `08`, no octal, was text), `0o17` octal (fifteen, where YAML 1.1 read text); a base-60 `1:30` (YAML 1.1's 90)
        is text, which an integer field refuses."""
        text = self.construct_scalar(node)
        digits = text.replace("_", "").lstrip("+-")
        if ":" in digits:
            return text
        if digits.startswith(("0x", "0b")):
            return super().construct_yaml_int(node)
        if digits.startswith("0o"):
            return (-1 if text.startswith("-") else 1) * int(digits[2:], 8)
        return int(text.replace("_", ""), 10)

    def construct_yaml_float(self, node):
        """A base-60 `1:30.5` is text, as in YAML 1.2 (YAML 1.1 read 90.5)."""
        text = self.construct_scalar(node)
        return text if ":" in text else super().construct_yaml_float(node)


# YAML 1.2's numbers that YAML 1.1 (PyYAML) reads as strings: floats with no dot (`1e-3`, `1e30`, `3e4`) or no
# exponent sign (`1.0e5`), decimals with a leading zero that are no octal (`08`). Read as numbers by every reader of
# YAML here (--set, --sweep, spec and train config files): a string got through to wherever a float field's check did
# not convert it (a study's JSON recorded `"lr": "1e30"`). Ints and floats as YAML 1.2 reads them: the constructors.
YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:[.][0-9_]*)?|[.][0-9_]+)[eE][-+]?[0-9]+$")
YAML12_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+)$")
BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))
BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:int", YAML12_INT, list("-+0123456789"))
BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
BoundedLoader.add_constructor("tag:yaml.org,2002:float", BoundedLoader.construct_yaml_float)


def parse_yaml(text: str | bytes) -> Any:
    """`yaml.safe_load` within the limits above (LimitError past them; yaml.YAMLError for bad YAML), with YAML 1.2's
    floats (YAML12_FLOAT) read as floats."""
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
