"""Long context: whole layers train in O(T) compiled memory on CPU, one v5e chip compiles a
long Sessa layer through splash, and the feedback gain keeps |gamma| < 1 in bfloat16."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import rel_err
from sessa_jax.models import AttentionBlock, SessaLayer
from sessa_jax.models.config import AttentionConfig, SessaConfig
from sessa_jax.ops.feedback import feedback_solve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layer_grad_temp_bytes(block, T, impl="auto", D=64):
    kw = dict(d_model=D, n_heads=4, attention_impl=impl)
    # feedback_unroll=0: the looped sweep, the one long sequences get. Short sweeps (<= 8 chunks)
    # are unrolled for speed and hold up to 8 chunks' tiles at once: bounded, but it would make
    # 1024 (2 chunks) against 4096 (8 chunks) compare two different programs.
    m = (SessaLayer(SessaConfig(**kw, feedback_unroll=0), rngs=nnx.Rngs(0)) if block == "sessa"
         else AttentionBlock(AttentionConfig(**kw), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(m)
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)), argnums=(0, 1)))
    x = jax.ShapeDtypeStruct((1, T, D), jnp.float32)
    return fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_whole_layers_grow_linearly_on_cpu():
    """jit(grad) of a whole layer: at most 5x the temporaries for 4x the length (the XLA
    attention path, which this replaced, grows ~16x: the contrast keeps the test honest)."""
    s1, s4 = _layer_grad_temp_bytes("sessa", 1024), _layer_grad_temp_bytes("sessa", 4096)
    assert s4 <= 5 * s1, (s1, s4)
    a1, a4 = (_layer_grad_temp_bytes("transformer", T) for T in (1024, 4096))
    assert a4 <= 5 * a1, (a1, a4)
    x1, x4 = (_layer_grad_temp_bytes("transformer", T, "xla") for T in (1024, 4096))
    assert x4 >= 10 * x1, (x1, x4)


def test_one_v5e_chip_compiles_a_long_sessa_layer(tmp_path):
    """AOT for one TPU v5e chip (libtpu, no TPU): a Sessa layer at T=16384 fits in 16 GiB and
    its forward branch is the splash kernel (a Mosaic custom call), not XLA attention."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "XLA_FLAGS"))}
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "aot_layer.py"), "--topology", "v5e:2x2",
         "--lengths", "16384", "--d-model", "128", "--heads", "1", "--chunk", "1024",
         # one scan instead of eight: the compile takes 29 s instead of ~100 s with two
         # (2026-12-03, this CPU) and the temporaries are 0.11 GiB; the memory bound below
         # is the same for any number of segments
         "--segments", "1",
         "--json", str(tmp_path / "aot.json")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert "cannot get TPU topology" not in out, "libtpu missing or topology API failed:\n" + out
    assert p.returncode == 0, out
    import json

    (rec,) = json.loads((tmp_path / "aot.json").read_text())["results"]
    assert rec["T"] == 16384 and rec["fits"] and rec["splash"], rec
    # O(T (D + chunk)): one (T, T) float32 score matrix alone would be 1 GiB
    assert rec["temporary"] < 0.5 * 2 ** 30, rec


def test_bf16_gamma_stays_below_one():
    """bfloat16 has no value in (0.99609375, 1): gamma is computed in float32 instead."""
    from sessa_jax.models.sessa import SessaMixer

    mixer = SessaMixer(SessaConfig(d_model=32, n_heads=2, dtype="bfloat16"), rngs=nnx.Rngs(0))
    a = jax.random.normal(jax.random.key(1), (2, 64, 32), jnp.bfloat16)
    for bias, strict in ((5.0, True), (50.0, False)):
        mixer.gamma_bias[...] = jnp.asarray(bias)
        _, _, gamma = mixer._feedback_inputs(a)
        assert gamma.dtype == jnp.float32
        g = np.asarray(gamma)
        assert np.all(np.abs(g) < 1.0), g.max()
        assert np.all(np.abs(g) <= np.float32(0.999))
        if strict:  # tanh(5 + noise) < 1: every gain strictly inside (0, gamma_max)
            assert np.all(g < np.float32(0.999)) and g.max() > 0.9962, g.max()
            assert len(np.unique(g)) > 100  # bf16 would give about ten distinct values here


def test_bf16_solve_gradients_close_to_float32_at_2048():
    """bf16 q_b, k_b, f with a float32 gamma at T=2048: dgamma and df within 2e-2 of the
    float32 solve (measured 2.5e-3 on CPU), s within the same."""
    T, D = 2048, 32
    ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 5)
    q, k, f = (jax.random.normal(x, (1, T, D)) for x in ks[:3])
    g = 0.999 * jnp.tanh(3.0 + jax.random.normal(ks[3], (1, T)))  # long memory: gamma ~ 0.99
    w = jax.random.normal(ks[4], (1, T, D))

    def loss(dt):
        def fn(q, k, g, f):
            # the looped sweep in two scans: the program long sequences get, and a fraction
            # of the unrolled eight-chunk sweep's compile time
            s = feedback_solve(q.astype(dt), k.astype(dt), g, f.astype(dt), chunk_size=256,
                               segments=2, unroll=0)
            return jnp.sum(s.astype(jnp.float32) * w)
        return fn

    g32 = jax.grad(loss(jnp.float32), argnums=(2, 3))(q, k, g, f)
    g16 = jax.grad(loss(jnp.bfloat16), argnums=(2, 3))(q, k, g, f)
    assert g16[0].dtype == jnp.float32  # dgamma in gamma's dtype
    assert rel_err(g16[0], g32[0]) < 2e-2, rel_err(g16[0], g32[0])
    assert rel_err(g16[1].astype(jnp.float32), g32[1]) < 2e-2
