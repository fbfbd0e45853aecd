"""Turn a text file into train/val token files for scripts/train.py: byte-level, or a BPE trained on the file.

    python scripts/prepare_data.py input.txt --out data/text                       # UTF-8 bytes, vocab 256
    python scripts/prepare_data.py input.txt --out data/text-bpe --tokenizer bpe --vocab-size 2048

DIR gets `train.bin` and `val.bin` (raw tokens, uint16, or uint32 past 65,536 ids: nanoGPT's
layout), `meta.json` (dtype, vocab_size, tokenizer, token counts) and, for BPE, `tokenizer.json`
(Hugging Face `tokenizers`, byte-level BPE), which train.py copies into every checkpoint so that
generate.py decodes text. The last --val-fraction of the tokens is the validation split. DIR is
built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from shared_config.cli import Parser, UsageError, check_input_outside, check_out_dir, run
from shared_config.data import TOKEN_DTYPES, DataError, read_meta, split_tokens, val_tokens
from shared_config.files import atomic_dir, json_text
from shared_config.limits import quote
from shared_config.progress import QUICK_S, progress
from shared_config.resources import check_memory

# BPE reads and encodes the text a chunk at a time, never all of it at once: at most this many lines, or of
# characters (the tokenizer holds ~200 bytes a character while it encodes), a line longer than MAX_LINE_CHARS cut in
# pieces (one 20 MB line took 4 GB, a file of one long line would have been killed for memory)
LINES_PER_CHUNK = 10_000
CHARS_PER_CHUNK = 1 << 20
MAX_LINE_CHARS = 1 << 16
CUT = re.compile(r"\s(?=\S)")  # before a whitespace that a non-whitespace follows: where pre-tokenization splits
TOKENS_PER_WRITE = 1 << 24
MAX_VOCAB = 1 << 32  # uint32 tokens
BPE_VOCAB = 4096  # --vocab-size's default
MIN_SPLIT_TOKENS = 2  # train.py reads windows of seq_len + 1 tokens from each split (TokenData.check), seq_len >= 1
# tokenizers' BpeTrainer reserves a hash map and a list of vocab_size entries before it reads a merge: ~33 bytes a
# bucket (a power of two >= 8/7 of the entries) and 24 an entry, an upper bound of 100 bytes a token
BPE_BYTES_PER_TOKEN = 100
WRITTEN = ("meta.json", "train.bin", "val.bin", "tokenizer.json")  # what write_data_dir puts in DIR, and nothing else
META_KEYS = ("vocab_size", "tokenizer", "source", "dtype", "train_tokens", "val_tokens")  # its meta.json's keys


def byte_tokens(path: Path) -> np.ndarray:
    """The file's bytes, one token each (what train.py reads from a text file on the fly), memory-mapped: read whole
    and widened, a 400 MB text took 1.5 GB (a corpus of a quarter of the machine's memory, all of it)."""
    return np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)


def write_tokens(tokens: np.ndarray, path: Path, dtype) -> None:
    """`tokens` as raw `dtype` ids, TOKENS_PER_WRITE at a time: one widened copy of the whole split is never made."""
    with open(path, "wb") as f:
        for start in range(0, len(tokens), TOKENS_PER_WRITE):
            tokens[start:start + TOKENS_PER_WRITE].astype(dtype).tofile(f)


def line_chunks(path: Path, desc: str, quiet: bool):
    """The file's lines (newlines kept; `lines`) in chunks of at most LINES_PER_CHUNK lines and about CHARS_PER_CHUNK
    characters, with a bar `desc` of the bytes read (once the pass takes a few seconds, unless `quiet`); bytes that
    are not UTF-8 raise UnicodeDecodeError."""
    with (open(path, encoding="utf-8", newline="") as f,
          progress(total=path.stat().st_size, desc=desc, unit="B", unit_scale=True, delay=QUICK_S, quiet=quiet) as bar):
        for chunk in in_chunks(lines(f)):
            yield chunk
            bar.update(sum(len(line.encode("utf-8")) for line in chunk))  # exact: the lines decoded untranslated


def in_chunks(pieces):
    """`pieces` (strings) in lists of at most LINES_PER_CHUNK items and about CHARS_PER_CHUNK characters."""
    chunk, chars = [], 0
    for piece in pieces:
        chunk.append(piece)
        chars += len(piece)
        if len(chunk) == LINES_PER_CHUNK or chars >= CHARS_PER_CHUNK:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def lines(f):
    """The lines of text file `f`, a line longer than MAX_LINE_CHARS in pieces of at most about that many characters,
    each cut before a whitespace character that a non-whitespace one follows (`CUT`): byte-level BPE's
    pre-tokenizer splits there anyway, so the pieces encode to the line's tokens. A run of MAX_LINE_CHARS characters
    without such a place (one "word") is cut where it ends. Each piece is under 2·MAX_LINE_CHARS characters; together
    they are the file's text exactly."""
    carry = ""
    while line := carry + f.readline(MAX_LINE_CHARS):
        carry = ""
        if len(line) >= MAX_LINE_CHARS and not line.endswith("\n"):
            cut = max((m.start() for m in CUT.finditer(line, 1)), default=0)
            if not cut or len(line) - cut >= MAX_LINE_CHARS:  # the rest would carry a whole "word" on
                cut = len(line)
            line, carry = line[:cut], line[cut:]
        yield line


def train_bpe(path: Path, vocab_size: int, quiet: bool = True):
    """A byte-level BPE (GPT-2 style: any text encodes, no unknown tokens) trained on the file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab_size = learnable_vocab(path, vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(line_chunks(path, "train BPE", quiet), trainer)
    return tokenizer


def learnable_vocab(path: Path, vocab_size: int) -> int:
    """`vocab_size`, at most what a BPE can learn from the file: each merge joins two tokens of the text, so 256 and
    one token a byte bound it; ResourceError where the trainer's up-front reservation cannot fit in memory (it
    reserves room for vocab_size tokens: --vocab-size 2**32 on a 5 KB text was a 283 GB allocation, and a Rust
    abort with its stack trace)."""
    vocab_size = min(vocab_size, 256 + path.stat().st_size)
    check_memory(BPE_BYTES_PER_TOKEN * vocab_size, f"training a BPE of up to {vocab_size:,} tokens",
                 "lower --vocab-size")
    return vocab_size


def bpe_tokens(tokenizer, path: Path, quiet: bool = True) -> np.ndarray:
    """The file encoded by `tokenizer`, a chunk of lines at a time, as uint32. Each chunk becomes an array at once:
    the ids of the whole file held as Python lists cost about 36 bytes a token (9 GB for a 1 GB corpus), not 4."""
    parts = [np.fromiter((i for e in tokenizer.encode_batch(chunk) for i in e.ids), np.uint32)
             for chunk in line_chunks(path, "encode", quiet)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


def write_data_dir(out: Path, train: np.ndarray, val: np.ndarray, meta: dict, tokenizer, force: bool) -> None:
    """train.bin, val.bin, meta.json (and tokenizer.json), all or nothing."""
    dtype = np.uint16 if meta["vocab_size"] <= 1 << 16 else np.uint32
    with atomic_dir(out, overwrite=force) as tmp:
        write_tokens(train, tmp / "train.bin", dtype)
        write_tokens(val, tmp / "val.bin", dtype)
        meta = {**meta, "dtype": np.dtype(dtype).name, "train_tokens": len(train), "val_tokens": len(val)}
        (tmp / "meta.json").write_text(json_text(meta, indent=1) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))


def foreign(out: Path) -> str | None:
    """Why `out` is not a data directory this script wrote (what --force may delete), or None: an empty or absent one,
    or exactly WRITTEN's files, described by a meta.json of META_KEYS whose dtype and token counts are the .bin files'
    sizes and whose tokenizer says whether tokenizer.json is there. Any meta.json was trusted: `{}` beside other files,
    or one describing other files, and --force deleted the directory whole."""
    if not out.is_dir() or not (names := {p.name for p in out.iterdir()}):
        return None
    if "meta.json" not in names:
        return "holds files but no meta.json"
    if others := sorted(names - set(WRITTEN)):
        return f"holds {quote(others[0])}, which prepare_data.py does not write"
    if odd := sorted(n for n in names if (out / n).is_symlink() or not (out / n).is_file()):
        return f"its {odd[0]} is not a regular file, which prepare_data.py writes"
    try:
        meta = read_meta(out)
    except DataError as e:
        return f"its meta.json cannot be read ({str(e).removeprefix(str(out / 'meta.json') + ': ')})"
    if set(meta) != set(META_KEYS) or meta["tokenizer"] not in ("byte", "bpe") or meta["dtype"] not in TOKEN_DTYPES:
        return f"its meta.json is not this script's (keys {', '.join(META_KEYS)}; tokenizer byte or bpe)"
    for split in ("train", "val"):
        count, path = meta[f"{split}_tokens"], out / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None  # a link or other entry: refused above
        if type(count) is not int or size != count * np.dtype(meta["dtype"]).itemsize:
            return f"its meta.json does not describe {split}.bin ({split}_tokens {quote(count)} of {meta['dtype']})"
    if ("tokenizer.json" in names) != (meta["tokenizer"] == "bpe"):
        there = "tokenizer.json is there" if "tokenizer.json" in names else "there is no tokenizer.json"
        return f"its meta.json says tokenizer {meta['tokenizer']}, but {there}"
    return None


def check_split(n_tokens: int, val_fraction: float) -> None:
    """Both splits keep at least MIN_SPLIT_TOKENS tokens, or UsageError names --val-fraction and the counts."""
    n_val = val_tokens(n_tokens, val_fraction)
    if min(n_tokens - n_val, n_val) < MIN_SPLIT_TOKENS:
        raise UsageError(f"--val-fraction {val_fraction} splits {n_tokens} tokens into {n_tokens - n_val} train and "
                         f"{n_val} validation tokens; train.py needs at least seq_len + 1 >= {MIN_SPLIT_TOKENS} in "
                         "each (more text, or another --val-fraction)")


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path, help="a text file (UTF-8 for BPE; any bytes for byte-level)")
    p.add_argument("--out", type=Path, required=True, help="the data directory to write")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                   help="UTF-8 bytes, or a BPE trained on the file")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE: the vocabulary to learn (at most; small texts learn fewer; default {BPE_VOCAB})")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the last part of the tokens kept for validation")
    p.add_argument("--force", action="store_true", help="replace an existing --out that this script wrote")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (shown for BPE past a few seconds)")
    args = p.parse_args(argv)
    if not args.input.is_file():
        what = ("a directory" if args.input.is_dir() else "not a regular file (a FIFO or a device)"
                if args.input.exists() else "no such file")  # a FIFO or /dev/zero was "no such file"
        raise UsageError(f"{args.input}: {what}; give a text file")
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to replace it")
    check_out_dir("--out", args.out)
    check_input_outside("--out", args.out, "INPUT", args.input)
    if problem := foreign(args.out):
        raise UsageError(f"--out {args.out}: {problem}; --force replaces only a data directory prepare_data.py wrote: "
                         "remove it yourself or pick another --out")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
    if args.tokenizer == "byte" and args.vocab_size is not None:  # it was ignored without a word
        raise UsageError(f"--vocab-size {args.vocab_size}: the BPE's vocabulary (--tokenizer bpe); --tokenizer byte "
                         "has 256")
    args.vocab_size = BPE_VOCAB if args.vocab_size is None else args.vocab_size
    if args.tokenizer == "bpe" and not 256 < args.vocab_size <= MAX_VOCAB:
        raise UsageError(f"--vocab-size {args.vocab_size} must be > 256 (the byte alphabet) and <= 2**32 = "
                         f"{MAX_VOCAB} (uint32 token ids)")
    try:
        tokenizer = train_bpe(args.input, args.vocab_size, args.quiet) if args.tokenizer == "bpe" else None
        tokens = bpe_tokens(tokenizer, args.input, args.quiet) if tokenizer else byte_tokens(args.input)
    except UnicodeDecodeError as e:
        raise DataError(f"{args.input}: not UTF-8 text ({e.reason}); use --tokenizer byte") from None
    check_split(len(tokens), args.val_fraction)
    train, val = split_tokens(tokens, args.val_fraction, args.input)
    vocab_size = tokenizer.get_vocab_size() if tokenizer else 256
    meta = {"vocab_size": vocab_size, "tokenizer": args.tokenizer, "source": args.input.name}
    args.out.parent.mkdir(parents=True, exist_ok=True)  # only now: a refused input leaves no directory behind
    write_data_dir(args.out, train, val, meta, tokenizer, args.force)
    print(json_text({"out": str(args.out), **meta, "train_tokens": len(train), "val_tokens": len(val)}))


if __name__ == "__main__":
    run(main)
