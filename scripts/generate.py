r"""Generate with either twin and its KV cache, streaming tokens to stdout as they come.

    python scripts/generate.py --backend jax --weights tiny.safetensors --tokens 1,2,3 --max-new-tokens 32
    python scripts/generate.py --backend torch --weights tiny.safetensors --prompt "Once upon" \
        --temperature 0.8 --top-p 0.9

Text prompts use the `tokenizer.json` (Hugging Face `tokenizers`) beside the weights, else UTF-8
bytes as token ids (vocab_size >= 256). With --tokens the new ids are printed, space-separated.
Timing goes to stderr (--quiet: none): the first token (prefill, and compilation in JAX) apart from the rest.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable

from shared_config import did_you_mean
from shared_config.cli import Parser, UsageError, fail, run, utf8_argument
from shared_config.data import read_tokenizer, tokenizer_beside
from shared_config.limits import quote
from shared_config.formats import quiet_libraries, read_checkpoint
from shared_config.generation import GenerationError, check_generation
from shared_config.twins import twin


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=["jax", "torch"], help="the twin that generates")
    p.add_argument("--weights", required=True, type=Path,
                   help="a canonical .safetensors file, a Hugging Face or Orbax directory, or a .pt file")
    p.add_argument("--spec", help="preset name or YAML path, for a file that carries no spec")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (tokenizer.json beside the weights, else UTF-8 bytes)")
    src.add_argument("--tokens", help="comma-separated token ids, digits without a sign, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    # Sampling options left unset take generate()'s defaults (greedy, seed 0, no eos).
    p.add_argument("--temperature", type=float, help="0: greedy (default: 0)")
    p.add_argument("--top-k", type=int, help="draw from the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float,
                   help="draw from the smallest top set holding this probability (default: 1, all)")
    p.add_argument("--seed", type=int, help="sampling seed (default: 0)")
    p.add_argument("--eos-id", type=int, help="stop at this token id")
    p.add_argument("--attention", default="auto",
                   help="attention kernel (jax: auto|einsum|blocked|xla|cudnn|pallas, torch: "
                        "auto|einsum|blocked|sdpa|flash|cudnn|pallas; pallas on a TPU only)")
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr (only errors)")
    args = p.parse_args(argv)

    if args.prompt is not None:  # not UTF-8 (a Latin-1 terminal): no tokenizer can encode it
        utf8_argument("--prompt", args.prompt)
    weights, spec = load_weights(args.weights, args.spec)
    text = load_tokenizer(args.weights, spec) if args.prompt is not None else None
    prompt = text.encode(args.prompt) if text else parse_tokens(args.tokens)
    if not prompt:  # generate's own words, "every prompt needs at least one token", named no option
        raise UsageError(f"--prompt {quote(args.prompt)} encodes to no tokens: give it some text, or pass --tokens")
    if text and (past := [i for i in prompt if i >= spec.V]):  # an added special token's text: "prompt 0: token id"
        raise UsageError(f"--prompt: {tokenizer_beside(args.weights)} encodes it to token id {past[0]}, past the "
                         f"model's vocabulary 0..{spec.V - 1} (an added token the model was not trained with)")
    options = {k: getattr(args, k)
               for k in ("temperature", "top_k", "top_p", "seed", "eos_id") if getattr(args, k) is not None}
    try:  # before loading a framework, so that a bad argument fails fast
        check_generation(spec, [prompt], args.max_new_tokens, **options)
    except GenerationError as e:  # generate()'s names (max_new_tokens=64) as the options that set them
        raise UsageError(OPTION_NAMES.sub(lambda m: f"--{m[1].replace('_', '-')} ", str(e))) from None
    if not options.get("temperature") and (sampling := [k for k in ("top_k", "top_p", "seed") if k in options]):
        # greedy decoding draws nothing: these were ignored without a word
        flag = "--" + sampling[0].replace("_", "-")
        raise UsageError(f"{flag} shapes sampling, and decoding is greedy (--temperature 0, the default): pass "
                         "--temperature T > 0 to sample, or leave it out")
    if args.attention != "auto" and not spec.attention_layers:  # the model has no attention layer: it was ignored
        raise UsageError(f"--attention {args.attention}: this model's layers are mixer={spec.mixer}, with no attention "
                         "kernel to choose (drop --attention)")
    model, stream = load_backend(args.backend, weights, spec, args.attention)
    steps = (int(next_B[0]) for next_B in stream(model, [prompt], args.max_new_tokens, **options))
    err = None if args.quiet else sys.stderr
    try:
        if text:
            show = TextStream(text.decode)
            emit(steps, show, sys.stdout, err, rest=show.rest)
        else:
            emit(steps, lambda token: f"{token} ", sys.stdout, err)
    except GenerationError as e:  # logits no token can be drawn from (NaN weights): one line, exit code 1
        print(file=sys.stdout)
        fail(str(e), 1)


OPTION_NAMES = re.compile(r"\b(max_new_tokens|temperature|top_k|top_p|seed|eos_id)=")


def load_weights(path: Path, spec=None):
    """Canonical weights and their spec, from any format convert.py reads (shared_config.formats)."""
    quiet_libraries()
    return read_checkpoint(path, spec)


def parse_tokens(csv: str) -> list[int]:
    """Comma-separated ids in plain ASCII digits, no sign: int() alone also read '1_0' as 10 and other scripts' digits
    ('１'); '-0' was read as 0 while '+1' was refused (an id is never negative: one spelling, digits only)."""
    if not all(re.fullmatch(r"\s*[0-9]+\s*", t) for t in csv.split(",")):
        raise UsageError(f"--tokens {quote(csv)} must be comma-separated integer ids, digits 0-9 without a sign, "
                         "e.g. 1,2,3")
    # past int64, leading zeros aside: int() of 4,301 digits raised ValueError "Exceeds the limit", a traceback
    if long := [t.strip() for t in csv.split(",") if len(t.strip().lstrip("0")) > 20]:
        raise UsageError(f"--tokens: id {quote(long[0])} is outside any vocabulary (ids are int32 in the twins)")
    return [int(t) for t in csv.split(",")]


class ByteTokenizer:
    """Text as UTF-8 bytes, one token per byte; ids >= 256 (special tokens) decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json, with the same two methods."""

    def __init__(self, path: Path):
        self.tokenizer = read_tokenizer(path)  # CheckpointError for a file tokenizers cannot read

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def load_tokenizer(weights: Path, spec):
    """The tokenizer.json saved beside the weights, else bytes when the vocabulary holds them."""
    path = tokenizer_beside(weights)
    if path.exists() or path.is_symlink():  # a FIFO, a broken file or link there is refused, not replaced by bytes
        tokenizer = HFTokenizer(path)
        # its own vocabulary past the model's: "prompt 0: token id 263 is outside the vocabulary" (added special
        # tokens, which encoding text rarely yields, are not counted)
        if (n := tokenizer.tokenizer.get_vocab_size(with_added_tokens=False)) > spec.V:
            raise UsageError(f"{path}: the tokenizer has {n} tokens but the model's vocab_size is {spec.V}: not the "
                             "tokenizer these weights were trained with; put theirs beside them, or pass --tokens")
        return tokenizer
    if spec.V >= 256:
        return ByteTokenizer()
    raise UsageError(f"no {path} and vocab_size={spec.V} < 256 cannot hold bytes: pass --tokens")


def load_backend(backend: str, weights, spec, attention: str):
    """The model in the chosen twin, and that twin's `stream`; float32 matmuls at full precision on every device."""
    twin(backend, "precision").exact_float32()
    ATTENTION = twin(backend, "attention").ATTENTION
    if attention not in ATTENTION:
        raise UsageError(f"--attention {attention} is not offered by the {backend} twin (one of {', '.join(ATTENTION)})"
                         f"{did_you_mean(attention, ATTENTION)}")
    return twin(backend).from_weights(weights, spec, attention), twin(backend, "generate").stream


class TextStream:
    """Token ids to text as they come: each call returns what decoding every id so far adds."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.shown = decode, [], ""

    def __call__(self, token: int) -> str:
        self.ids.append(token)
        return self.rest(hold_cut=True)

    def rest(self, hold_cut: bool = False) -> str:
        """The text not shown yet. At the end (`hold_cut` False) a character cut off for good shows as U+FFFD, as
        decoding shows it; mid-stream, text ending in U+FFFD (most likely a character cut mid-way) waits."""
        text = self.decode(self.ids)
        if hold_cut and text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def emit(steps, show: Callable[[int], str], out, err, rest: Callable[[], str] = lambda: "") -> None:
    """Write each token as soon as it is drawn (`show`), then what `rest` says was held back, then the timing:
    the first two tokens (prefill, then the first decode step, compilation included in JAX) apart from the
    steady decoding rate, to `err` (None: no timing)."""
    times = [time.perf_counter()]
    for token in steps:
        out.write(show(token))
        out.flush()
        times.append(time.perf_counter())
    out.write(rest() + "\n")
    if err is None:
        return
    n, (start, end) = len(times) - 1, (times[0], times[-1])
    first = ", ".join(f"{t - s:.2f} s" for s, t in zip(times[:2], times[1:3]))
    rate = f"; then {(n - 2) / (end - times[2]):.1f} tokens/s" if n > 2 else ""
    print(f"{n} tokens in {end - start:.2f} s: the first two after {first} (prefill, first decode step){rate}",
          file=err)


if __name__ == "__main__":
    run(main)
