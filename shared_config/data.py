"""Training data (numpy only): token files, text read as bytes, an embedded synthetic corpus, and
batches that are a pure function of (seed, step), so both twins, and a run resumed in the other
framework, read exactly the same tokens.

Sources (`load_data`):
- `synthetic[:SEED]`: a Markov chain over 256 tokens (Zipf unigrams plus bigram transitions),
  generated from the seed; its entropy rate, the loss a perfect model reaches, is known exactly.
- a directory written by scripts/prepare_data.py: `train.bin`, `val.bin`, `meta.json` and, for
  BPE, `tokenizer.json`;
- a token file: `.npy` (uint8/16/32, 1-D), or `.bin`, raw tokens as nanoGPT writes them, whose
  dtype is the `dtype` argument, else the `meta.json` beside it, else uint16 (nanoGPT's);
- any other file: text, one token per UTF-8 byte (vocab 256).
Files are memory-mapped; a single file's last `val_fraction` is the validation split.

Notation: B batch, N = T + 1 tokens per batch row, T positions the model reads, V vocab.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import CheckpointError, read_json
from .generation import is_int
from .corpus import SYNTHETIC_VOCAB, chain_tokens
from .limits import quote

BRANCHING = 4  # successors per token in `synthetic_batch`'s chain

TOKEN_DTYPES = ("uint8", "uint16", "uint32")
SYNTHETIC_TRAIN_TOKENS = 1 << 20
SYNTHETIC_VAL_TOKENS = 1 << 16
_BATCH_STREAM = 2  # separates the batch order's random stream from the corpus's own


class DataError(ValueError):
    """Training data that cannot be used as asked; the message names the file and the problem."""


def synthetic_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """int32 tokens [batch_size, seq_len + 1] from a seeded bigram chain with learnable structure.

    Every token has `BRANCHING` successors drawn once from `seed`; each next token picks one of
    them uniformly, so a model that learns the table reaches a loss of about log(BRANCHING). A seed or step below 0, a
    batch_size, seq_len or vocab_size below 1 (or not an integer) is a DataError naming it: seq_len -1 was an
    IndexError, vocab_size 0 numpy's ValueError, batch_size 2.0 a TypeError.
    """
    for name, value, lo in (("seed", seed, 0), ("step", step, 0), ("batch_size", batch_size, 1),
                            ("seq_len", seq_len, 1), ("vocab_size", vocab_size, 1)):
        if not is_int(value, lo):
            raise DataError(f"synthetic_batch: {name}={value!r} must be an integer >= {lo}")
    successors_VK = np.random.default_rng([seed, 0]).integers(0, vocab_size, (vocab_size, BRANCHING))
    rng = np.random.default_rng([seed, 1, step])
    picks_BN = rng.integers(0, BRANCHING, (batch_size, seq_len + 1))
    tokens_BN = np.empty((batch_size, seq_len + 1), np.int32)
    tokens_BN[:, 0] = rng.integers(0, vocab_size, batch_size)
    for n in range(1, seq_len + 1):
        tokens_BN[:, n] = successors_VK[tokens_BN[:, n - 1], picks_BN[:, n]]
    return tokens_BN


# --- a corpus split for training ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenData:
    """Train and validation tokens (1-D, memory-mapped for files) and what they came from."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int  # every token id is below it
    source: str  # a path, or "synthetic:SEED"
    tokenizer: Path | None = None  # the tokenizer.json the ids come from, if any
    entropy: float | None = None  # nats per token of the generating process (the synthetic corpus)
    vocab_from_ids: bool = False  # vocab_size is the largest id + 1 of raw .bin files without a meta.json vocab_size,
    #   read as the dtype --data-dtype or meta.json named (uint16 by default)

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """int32 tokens [B, T+1]: windows of the train split at offsets drawn from (seed, step) alone."""
        starts_B = np.random.default_rng([seed, _BATCH_STREAM, step]).integers(0, len(self.train) - seq_len, batch_size)
        return np.stack([self.train[s : s + seq_len + 1] for s in starts_B]).astype(np.int32)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[np.ndarray]:
        """Fixed int32 batches [B, T+1] spread evenly over the validation split (the same at every eval), gathered in
        one indexing of the split's windows (a Python loop over the rows took minutes at --eval-batches 1000000).
        Their bytes: `eval_bytes` (scripts/train.py checks them against the memory before building them)."""
        starts = np.linspace(0, len(self.val) - seq_len - 1, n_batches * batch_size).astype(np.int64)
        rows = np.lib.stride_tricks.sliding_window_view(self.val, seq_len + 1)[starts].astype(np.int32)
        return list(rows.reshape(n_batches, batch_size, seq_len + 1))

    def check(self, seq_len: int, vocab_size: int) -> None:
        """Both splits hold a window of `seq_len + 1` tokens and every id fits the model's vocabulary."""
        for split, tokens in (("train", self.train), ("validation", self.val)):
            if len(tokens) < seq_len + 1:
                raise DataError(f"{self.source}: the {split} split holds {len(tokens)} tokens, "
                                f"fewer than seq_len + 1 = {seq_len + 1}")
        if self.vocab_size > vocab_size:
            raise DataError(
                f"{self.source}: token ids go up to {self.vocab_size - 1} but the model's vocab_size is {vocab_size} "
                f"(pass --set vocab_size={self.vocab_size} or a spec with a larger vocabulary)"
            )

    def describe(self) -> dict:
        """What a checkpoint records about its data (a resumed run checks it reads the same).

        The data is identified by what it is: sizes and a SHA-256 of both splits' token ids. No float
        computed at run time belongs here: the entropy rate comes from `np.linalg.solve`, whose last bits
        change with the BLAS thread count, so a run resumed under another launcher would be refused.
        """
        source = self.source if self.source.startswith("synthetic") else str(Path(self.source).resolve())
        return {"source": source, "vocab_size": self.vocab_size, "train_tokens": len(self.train),
                "val_tokens": len(self.val), "sha256": tokens_sha256(self.train, self.val)}


def eval_bytes(n_batches: int, batch_size: int, seq_len: int) -> int:
    """Host bytes of `TokenData.val_batches`: the int32 rows, the row starts and one int64 copy of the rows."""
    rows = n_batches * batch_size
    return rows * ((seq_len + 1) * (4 + 8) + 2 * 8)


def tokens_sha256(*splits: np.ndarray, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of the splits' token ids as little-endian int64 (any storage dtype hashes alike), read in chunks."""
    digest = hashlib.sha256()
    for tokens in splits:
        for start in range(0, len(tokens), chunk):
            digest.update(np.ascontiguousarray(tokens[start : start + chunk], dtype="<i8").tobytes())
        digest.update(b"|")  # a boundary between splits: moving a token across it changes the hash
    return digest.hexdigest()


def is_synthetic(source: str | Path) -> bool:
    """Whether `source` names the embedded corpus (`synthetic[:SEED]`): no file is read, whatever one is there."""
    return str(source) == "synthetic" or str(source).startswith("synthetic:")


def reads_raw_tokens(source: str | Path) -> bool:
    """Whether load_data reads `source` as raw .bin tokens, the ones `dtype` (--data-dtype) applies to: a .bin file,
    or a data directory whose train split is train.bin (_load_prepared takes it before train.npy)."""
    path = Path(source)
    return not is_synthetic(source) and (path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").is_file()))


def load_data(source: str | Path, dtype: str | None = None, val_fraction: float = 0.1) -> TokenData:
    """A `TokenData` from `synthetic[:SEED]`, a prepared directory, a token file or a text file."""
    name = str(source)
    if not name:  # Path("") is the current directory: `--data ''` trained on whatever files were there
        raise DataError("the data source is an empty string: give synthetic[:SEED], a data directory, a token file or "
                        "a text file")
    if is_synthetic(name):
        if dtype is not None:  # it was ignored without a word
            raise DataError(f"--data-dtype {dtype} reads raw .bin token files; the synthetic corpus has none")
        seed = name.partition(":")[2] or "0"
        if not seed.isdigit():
            raise DataError(f"{name}: the synthetic corpus takes a seed, e.g. synthetic:0")
        return synthetic_corpus(int(seed))
    path = Path(source)
    if path.is_dir():
        return _load_prepared(path, dtype)
    tokens, vocab_size, from_ids = open_tokens(path, dtype)
    # text is bytes, whatever lies beside it
    tokenizer = _tokenizer_in(path.parent) if path.suffix in (".bin", ".npy") else None
    return TokenData(*split_tokens(tokens, val_fraction, path), vocab_size, str(path), tokenizer,
                     vocab_from_ids=from_ids)


def val_tokens(n_tokens: int, val_fraction: float) -> int:
    """How many of `n_tokens` the validation split takes: the last `val_fraction`, rounded down."""
    return int(n_tokens * val_fraction)


def split_tokens(tokens: np.ndarray, val_fraction: float, source) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last `val_fraction` of the tokens is the validation split."""
    n_val = val_tokens(len(tokens), val_fraction)
    if n_val < 1 or n_val >= len(tokens):
        raise DataError(f"{source}: {len(tokens)} tokens are too few to split off a validation fraction of "
                        f"{val_fraction}")
    return tokens[:-n_val], tokens[-n_val:]


def _load_prepared(path: Path, dtype: str | None) -> TokenData:
    """A directory holding train.{bin,npy} and val.{bin,npy} (scripts/prepare_data.py, nanoGPT)."""
    splits = []
    for split in ("train", "val"):
        # one there that is no file (a link to /dev/zero, a broken link) is named as such, not as missing
        found = [p for p in (path / f"{split}.bin", path / f"{split}.npy") if p.exists() or p.is_symlink()]
        if not found:
            raise DataError(f"{path}: a data directory needs {split}.bin or {split}.npy")
        splits.append(open_tokens(found[0], dtype))
    (train, train_vocab, train_from_ids), (val, val_vocab, val_from_ids) = splits
    return TokenData(train, val, max(train_vocab, val_vocab), str(path), _tokenizer_in(path),
                     vocab_from_ids=train_from_ids or val_from_ids)


def open_tokens(path: Path, dtype: str | None = None) -> tuple[np.ndarray, int, bool]:
    """A 1-D memory-mapped token array, its vocabulary size (meta.json's, else max id + 1) and whether that size
    is a raw .bin's largest id + 1 (`TokenData.vocab_from_ids`: read as a wrong dtype, its ids are garbage).

    A meta.json vocab_size (a BPE's may exceed the ids used) must be an int >= the largest id + 1, or DataError
    names the file, the key and the largest id; the ids are scanned once, in chunks (`_max_id`).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    meta = read_meta(path.parent)
    if dtype is not None and path.suffix != ".bin":  # it was ignored without a word
        kind = "a .npy file carries its own dtype" if path.suffix == ".npy" else "a text file's tokens are its bytes"
        raise DataError(f"{path}: --data-dtype {dtype} reads raw .bin token files; {kind} (drop --data-dtype)")
    if dtype is not None and meta.get("dtype") not in (None, dtype):  # read as another dtype: ids of garbage
        said = meta["dtype"] if isinstance(meta["dtype"], str) else quote(meta["dtype"])  # `true` as JSON writes it
        raise DataError(f"{path}: --data-dtype {dtype}, but {path.parent / 'meta.json'} says dtype {said} (drop "
                        "--data-dtype)")
    if path.suffix == ".npy":
        tokens = _open_npy(path)
    elif path.suffix == ".bin":
        if dtype is None and meta.get("dtype", "uint16") not in TOKEN_DTYPES:  # named the .bin, not where it was
            raise DataError(f"{path.parent / 'meta.json'}: dtype must be one of {', '.join(TOKEN_DTYPES)}, got "
                            f"{quote(meta['dtype'])}")
        tokens = _open_bin(path, dtype or meta.get("dtype", "uint16"))
    else:  # text: its UTF-8 bytes are the tokens
        return _memmap(path, "uint8"), 256, False
    if tokens.dtype.name not in TOKEN_DTYPES:
        raise DataError(f"{path}: token dtype {tokens.dtype.name} is not one of {', '.join(TOKEN_DTYPES)}")
    _check_count(path, tokens, meta)
    largest = _max_id(tokens)
    if "vocab_size" not in meta:
        return tokens, largest + 1, path.suffix == ".bin"
    vocab_size = meta["vocab_size"]
    where = f"{path.parent / 'meta.json'}: vocab_size"
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise DataError(f"{where} must be an integer >= 1, got {quote(vocab_size)}")
    if vocab_size <= largest:
        raise DataError(f"{where} is {vocab_size} but {path.name} holds token id {largest}: it must be at least "
                        f"{largest + 1} (the largest id + 1)")
    return tokens, vocab_size, False


def _check_count(path: Path, tokens: np.ndarray, meta: dict) -> None:
    """The token count meta.json gives for `path` (`train_tokens` for train.bin, `val_tokens` for val.bin, as
    prepare_data.py writes them), when it gives one, must be the file's, else DataError: a copy cut short or a file
    replaced after prepare_data.py trained on what was there without a word, its vocabulary and tokenizer read from
    a meta.json that no longer described it."""
    said = meta.get(f"{path.stem}_tokens")
    if said is None or (isinstance(said, int) and not isinstance(said, bool) and said == len(tokens)):
        return
    raise DataError(f"{path}: holds {len(tokens):,} tokens, but {path.parent / 'meta.json'} says {path.stem}_tokens "
                    f"{quote(said)}: the file was changed after it was written (write the directory again with "
                    "scripts/prepare_data.py)")


def _open_npy(path: Path) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a valid .npy file: {' '.join(str(e).split())}") from None
    if tokens.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D array, found shape {list(tokens.shape)}")
    if len(tokens) == 0:
        raise DataError(f"{path}: holds no tokens")
    return tokens


def _open_bin(path: Path, dtype: str) -> np.ndarray:
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{path}: token dtype {quote(dtype)} is not one of {', '.join(TOKEN_DTYPES)}")
    size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens (wrong dtype, or a "
                        "truncated file?)")
    return _memmap(path, dtype)


def _memmap(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: holds no tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def _max_id(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """The largest token id, read in chunks so that a large memory-mapped file is never copied whole."""
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


def read_meta(directory: Path) -> dict:
    """`meta.json` of a data directory ({} when absent): dtype, vocab_size, tokenizer, token counts."""
    path = directory / "meta.json"
    if not path.exists():  # a FIFO or device in its place is refused by read_json, without blocking
        return {}
    try:
        return read_json(path)
    except CheckpointError as e:
        raise DataError(str(e)) from None


def _tokenizer_in(directory: Path) -> Path | None:
    """The data's tokenizer.json, read once (read_tokenizer) before a run copies it into every checkpoint: a broken
    one was copied without a word and refused only by generate.py --prompt."""
    tokenizer = directory / "tokenizer.json"
    if tokenizer.exists() and not tokenizer.is_file():  # copied whole into the run: never a FIFO or a device
        raise DataError(f"{tokenizer}: not a regular file; pass a data directory whose tokenizer.json is one")
    if not tokenizer.is_file():
        return None
    read_tokenizer(tokenizer, DataError)
    return tokenizer


def tokenizer_beside(weights: str | Path) -> Path:
    """The tokenizer.json of the weights at `weights`: in their directory (a run's checkpoint, a Hugging Face, fla or
    Orbax directory), else beside their file. generate.py encodes --prompt with it; convert.py carries it along."""
    weights = Path(weights)
    return (weights if weights.is_dir() else weights.parent) / "tokenizer.json"


def read_tokenizer(path: Path, error: type[Exception] = CheckpointError):
    """A Hugging Face `tokenizers.Tokenizer` from a tokenizer.json: a regular file of at most MAX_JSON_BYTES, UTF-8,
    that `tokenizers` reads; else `error` naming the file and what is wrong (tokenizers raises its own Exception
    subclass, with a Rust message, for a malformed file)."""
    from tokenizers import Tokenizer

    from .limits import MAX_JSON_BYTES, quote, read_capped

    try:
        text = read_capped(path, MAX_JSON_BYTES, "tokenizer file")  # a regular file, bounded, never a FIFO
        return Tokenizer.from_str(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not a valid tokenizers file: not UTF-8") from None
    except (OSError, ValueError) as e:
        raise error(str(e) if isinstance(e, ValueError) else f"{path}: cannot read: {e.strerror}") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"{path}: not a valid tokenizers file: {quote(first)[1:-1]}") from None


# --- the embedded synthetic corpus (shared_config/corpus.py) -----------------------------------


def synthetic_corpus(seed: int = 0, vocab_size: int = SYNTHETIC_VOCAB, train_tokens: int = SYNTHETIC_TRAIN_TOKENS,
                     val_tokens: int = SYNTHETIC_VAL_TOKENS) -> TokenData:
    """The embedded corpus, `synthetic:SEED`: `corpus.chain_tokens(seed)`'s first `train_tokens` tokens for training,
    the next `val_tokens` for validation, with the chain's entropy rate (nats), the loss a perfect model reaches."""
    tokens, entropy = chain_tokens(seed, vocab_size, train_tokens + val_tokens)
    return TokenData(tokens[:train_tokens], tokens[train_tokens:], vocab_size, f"synthetic:{seed}", entropy=entropy)
