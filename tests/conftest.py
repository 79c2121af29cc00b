"""Shared test helpers. Fixtures of the author's PyTorch layer live in tests/fixtures/."""

import glob
import json
import os

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


# The longest tests (minutes each on 2 cores), started first: with `pytest -n 2` a long test
# that is handed out last keeps one worker busy after the other has finished.
SLOW_FIRST = (
    "test_readme.py::test_readme_commands_run_as_written_after_the_quickstart",
    "test_long_context.py::test_one_v5e_chip_compiles_a_long_sessa_layer",
    "test_train_runs.py::test_sigterm_resume_across_meshes_and_corrupt_checkpoint",
    "test_fault_injection.py::test_sigkill_at_random_points_then_finish_equals_an_uninterrupted_run",
    "test_compare.py::test_compare_tiny",
    "test_long_context.py::test_whole_layers_grow_linearly_on_cpu",
)


def pytest_collection_modifyitems(config, items):
    # Whole modules move (their module-scoped fixtures, e.g. a reference training run, are
    # built once only while a module's tests stay together), each with its slow test first.
    mods = [n.split("::")[0] for n in SLOW_FIRST]
    mod_rank = {m: mods.index(m) for m in mods}

    def key(item):
        path, _, name = item.nodeid.partition("::")
        mod = path.rsplit("/", 1)[-1]
        slow = any(f"{mod}::{name}".startswith(n) for n in SLOW_FIRST)
        return (mod_rank.get(mod, len(mods)), not slow)

    items.sort(key=key)  # stable: everything else keeps its order
