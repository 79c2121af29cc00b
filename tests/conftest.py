"""Shared test helpers. Fixtures of the author's PyTorch layer live in tests/fixtures/."""

import glob
import json
import os
import shutil
import tempfile

# One persistent compilation cache for this test session: its in-process tests, both xdist
# workers and every subprocess they start (all inherit the environment set here, in the
# controller, before the workers start). Tests build the same tiny models again and again
# (fresh closures, so jit's in-memory cache misses); the persistent cache keys on the program,
# so each is compiled once. A new directory per session, removed at its end, so no result
# depends on an earlier run. A cache directory set by the caller is used and left alone.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="sessa-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# XLA's CPU backend without LLVM's optimisation passes: the suite's programs are tiny and each
# runs a few times, so compiling them is most of the suite's time and running them little;
# this cuts a compile by a third or more. Numerics are unchanged in kind (no fast-math): the
# float64 exactness tests pass as before. Set here, in the controller, so the workers and the
# subprocesses inherit it; subprocess tests that set XLA_FLAGS themselves add it (xla_flags).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: the suite's fast-compile flag and ``flags``."""
    return " ".join((FAST_COMPILE,) + flags)


if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

import jax
import numpy as np
import pytest

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "sessa_layer_*.npz")))


@pytest.fixture
def x64():
    """Run the test body with float64 enabled, restoring the previous setting after."""
    with jax.enable_x64(True):
        yield


def rel_err(got, want) -> float:
    """||got - want|| / ||want||, or the absolute error when ``want`` is all zeros."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = np.linalg.norm(want)
    num = np.linalg.norm(got - want)
    return float(num / den) if den > 0 else float(num)


def fixture_config(path: str, **overrides):
    from sessa_jax.models.config import SessaConfig

    with np.load(path) as z:
        c = json.loads(str(z["config_json"]))
    kw = dict(
        d_model=c["D"], n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"],
        use_rope=c["use_forward_rope"], gamma_max=c["gamma_max"], ln_eps=c["ln_eps"],
    )
    kw.update(overrides)
    return SessaConfig(**kw)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
