"""Forward+backward of one GLA layer's chunk form on CPU, in both twins (the pure form's speed, no accelerator).

    python bench/gla_cpu.py [--batch 1 --heads 4 --tokens 2048 --key 96 --value 192 --repeats 5]
    python bench/gla_cpu.py --compile-step gla-small --batch 8 --tokens 2048

Times `chunked_gla` (and, with --recurrent, `recurrent_gla`) of the checkout on PYTHONPATH: gradient of the sum
of Σ o·co + Σ S·cS (random cotangents, as a real backward gets: a plain sum's broadcast gradient sends torch's
bmm down a slow path) with respect to q, k, v, gates and the initial state. JAX: the jitted gradient,
compile time (first call) reported separately. Prints one table row per twin: median and min of the repeats in
seconds. Gates are logsigmoid(4·N(0, 1)) / 16 (gla's normalizer), float32. To compare two checkouts, run the
script under each one's PYTHONPATH. --compile-step SPEC: instead, the seconds XLA takes to lower and compile the
JAX twin's jitted train step (forward, backward, AdamW; the default train config) of SPEC at --batch x --tokens.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from shared_config import SpecError
from shared_config.cli import Parser, UsageError, at_least, run
from shared_config.twins import twin


def inputs(B, H, T, K, V, seed=0):
    """q, k, v, log-gates [B, H, T, ·] and a state [B, H, K, V], then the cotangents of the outputs [B, H, T, V]
    and of the last state [B, H, K, V]: float32 numpy."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, H, T, K), np.float32) * K**-0.5 for _ in range(2))
    v = rng.standard_normal((B, H, T, V), np.float32)
    g = (-np.logaddexp(0, -4 * rng.standard_normal((B, H, T, K))) / 16).astype(np.float32)
    co, cS = rng.standard_normal((B, H, T, V), np.float32), rng.standard_normal((B, H, K, V), np.float32)
    return (q, k, v, g, np.zeros((B, H, K, V), np.float32)), (co, cS)


def gla_form(name: str, recurrent: bool):
    """The form timed, from twin `name`: recurrent_gla, or chunked_gla at the twin's CHUNK."""
    gla = twin(name, "gla")
    return gla.recurrent_gla if recurrent else (lambda *a: gla.chunked_gla(*a, gla.CHUNK))


def time_jax(args, arrays, cotangents, recurrent):
    import jax
    import jax.numpy as jnp

    form = gla_form("jax", recurrent)
    loss = lambda xs, cs: sum(jnp.sum(x * c) for x, c in zip(form(*xs), cs))
    step = jax.jit(jax.grad(loss))
    xs, cs = [jnp.asarray(a) for a in arrays], [jnp.asarray(a) for a in cotangents]
    t0 = time.perf_counter()
    jax.block_until_ready(step(xs, cs))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(xs, cs))
        times.append(time.perf_counter() - t0)
    return compile_s, times


def time_torch(args, arrays, cotangents, recurrent):
    import torch

    form = gla_form("torch", recurrent)
    times = []
    for r in range(args.repeats + 1):  # the first call warms up
        xs, cs = [torch.tensor(a, requires_grad=True) for a in arrays], [torch.tensor(a) for a in cotangents]
        t0 = time.perf_counter()
        sum((x * c).sum() for x, c in zip(form(*xs), cs)).backward()
        if r:
            times.append(time.perf_counter() - t0)
    return None, times


def compile_step(spec_name, batch, tokens):
    """Seconds to lower and compile the JAX twin's train step of `spec_name` on [batch, tokens] int32 tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_model
    from jax_model import train
    from shared_config import load_spec, load_train_config

    spec, cfg = load_spec(spec_name), load_train_config(None)
    model = jax_model.Transformer(spec, rngs=nnx.Rngs(0))
    state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
    t0 = time.perf_counter()
    step.lower(state, jax.ShapeDtypeStruct((batch, tokens), jnp.int32)).compile()
    return time.perf_counter() - t0


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    for flag, default in (("batch", 1), ("heads", 4), ("tokens", 2048), ("key", 96), ("value", 192), ("repeats", 5)):
        p.add_argument(f"--{flag}", type=at_least(1), default=default, help=f"(default {default})")
    p.add_argument("--recurrent", action="store_true", help="time the token-by-token recurrence instead")
    p.add_argument("--backend", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--compile-step", metavar="SPEC", help="time the compile of the JAX train step of SPEC instead")
    args = p.parse_args(argv)
    if args.compile_step:
        try:
            seconds = compile_step(args.compile_step, args.batch, args.tokens)
        except SpecError as e:
            raise UsageError(f"--compile-step: {e}") from None
        print(f"# jax train step of {args.compile_step}, batch {args.batch} x {args.tokens}: compile {seconds:.1f} s")
        return 0
    arrays, cotangents = inputs(args.batch, args.heads, args.tokens, args.key, args.value)
    checkout = os.path.dirname(os.path.dirname(twin("jax", "gla").__file__))
    print(f"# gla fwd+bwd, B {args.batch} H {args.heads} T {args.tokens} K {args.key} V {args.value}, "
          f"{'recurrent' if args.recurrent else 'chunked'}, from {checkout}")
    print("| twin | median s | min s | compile s |\n|---|---|---|---|")
    for name, fn in (("jax", time_jax), ("torch", time_torch)):
        if args.backend in (name, "both"):
            compile_s, times = fn(args, arrays, cotangents, args.recurrent)
            c = "" if compile_s is None else f"{compile_s:.2f}"
            print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {c} |", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
