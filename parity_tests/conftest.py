"""Precision pinned for both frameworks, so the same tests are strict on a GPU too; no network; every test in a
scratch directory, failing if it writes into the checkout (checkout_guard.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hugging Face tests build their models locally

import torch

from jax_model.precision import exact_float32 as jax_exact_float32
from torch_model.precision import exact_float32 as torch_exact_float32

# float32 matmuls at full precision: JAX would use TF32 (GPU) or bf16 passes (TPU) by default,
# torch may have TF32 enabled by the user's environment.
jax_exact_float32()
torch_exact_float32()
torch.manual_seed(0)
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest-xdist: each worker computes on its share of
    # the CPUs; torch's pool sized to all of them oversubscribed the machine (every worker's threads on every core)
    from bench.load import usable_cpus

    torch.set_num_threads(max(1, usable_cpus() // int(workers)))


import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from .support.checkout_guard import CheckoutGuard  # noqa: E402
from .support import compile_caches  # noqa: E402
from .support.compile_caches import cache_settings, restore_cache_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GUARD: CheckoutGuard | None = None  # made once pytest's base temp is known


@pytest.fixture(scope="session", autouse=True)
def session_scratch_env(tmp_path_factory):
    """The tools' default compile cache ($XDG_CACHE_HOME/twinlm/compile) and every subprocess's temp directory
    (TMPDIR) in pytest's base temp, which pytest prunes, for every test and every tool it starts: the suite wrote
    JAX's programs into the user's ~/.cache/twinlm, and found them there in the next run (warm in one run, cold in
    another, never as CI's fresh machine), and each torchrun left a `torchelastic_*` directory in /tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        compile_caches.SESSION_SETTINGS = cache_settings()
        yield


@pytest.fixture(autouse=True)
def compile_caches_as_they_were():
    """The persistent compilation caches as the test found them: one that ran a tool in-process turned them on for
    the rest of its worker, and every later test's programs were written to disk (set up before `scratch_cwd`'s
    monkeypatch, so torn down after it)."""
    before = cache_settings()
    yield
    if cache_settings() != before:
        restore_cache_settings(before)


THREAD_ENV = ("OMP_NUM_THREADS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE")  # what bench's configure_threads sets


@pytest.fixture(autouse=True)
def cpu_threads_as_they_were():
    """torch's threads, this process's CPUs and the thread variables as the test found them: compare.main run
    in-process (bench/options.py's configure_threads, timing's set_precision_and_threads) left torch on every CPU
    for the rest of its worker, and each op of a later test waited on a thread the other worker held (100 steps
    of torch training 4x slower, measured with 2 workers on 2 cores)."""
    threads, env = torch.get_num_threads(), {name: os.environ.get(name) for name in THREAD_ENV}
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if cpus is not None and os.sched_getaffinity(0) != cpus:
        os.sched_setaffinity(0, cpus)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def session_scratch_cwd(tmp_path_factory):
    """Module and session fixtures, set up before `scratch_cwd`, run in a scratch directory too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("session-cwd"))
        yield


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path_factory, monkeypatch):
    """Every test runs in an empty scratch directory: a default output (`runs/tiny`) a test forgot to redirect
    lands there, never in the checkout, and nothing a user keeps in the checkout changes a test's outcome."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def pytest_sessionstart(session):
    """Start the guard; writing under pytest's base temp or the temp directory is fine, wherever they are."""
    global GUARD
    scratch = (session.config.option.basetemp, os.environ.get("PYTEST_DEBUG_TEMPROOT"), tempfile.gettempdir())
    GUARD = CheckoutGuard(ROOT, skip=tuple(p for p in scratch if p))


def _guarded(item, phase: str):
    """Run one phase (setup, call, teardown) of a test recording what it writes into the checkout; a write fails
    that phase, naming the files. Only this test process's own writes count: a user's files never do."""
    GUARD.take()
    GUARD.recording = True
    try:
        result = yield
    finally:
        GUARD.recording = False
    if written := GUARD.take():
        raise AssertionError(f"this test's {phase} wrote into the checkout {ROOT}: {', '.join(written[:10])}")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded(item, "teardown"))
