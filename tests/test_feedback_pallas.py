"""feedback_impl="pallas" (Pallas kernels, interpret mode on CPU) against the dense reference:
values and gradients, float32 and float64, odd lengths, T = 1, segment ids; the TPU (Mosaic)
design by default and the GPU (Triton) one with ``kernels="gpu"``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, xla_flags
from sessa_jax.ops.feedback import feedback_solve
from sessa_jax.ops.feedback_pallas import feedback_pallas


def _seed():
    return int(np.random.SeedSequence().generate_state(1)[0] % 2**31)  # fresh every run


def _inputs(seed, B, T, D, sharp=1.0, gscale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    dt = jnp.asarray(0.0).dtype  # float64 under the x64 fixture
    q = sharp * jax.random.normal(ks[0], (B, T, D), dt)
    k = jax.random.normal(ks[1], (B, T, D), dt)
    f = jax.random.normal(ks[2], (B, T, D), dt)
    g = (0.999 * jnp.tanh(gscale * jax.random.normal(ks[3], (B, T), dt))).astype(dt)
    w = jax.random.normal(ks[4], (B, T, D), dt)
    return q, k, g, f, w


def _both(args, chunk, seg=None, **kw):
    q, k, g, f, w = args
    out = []
    for impl in ("dense", "pallas"):
        def loss(q, k, g, f):
            if impl == "dense":
                s = feedback_solve(q, k, g, f, impl="dense", segment_ids=seg)
            elif "block" in kw:  # the kernel's own tile knob (feedback_solve keeps the default)
                s = feedback_pallas(q, k, g, f, chunk_size=chunk, segment_ids=seg, **kw)
            else:  # through the one dispatch point
                s = feedback_solve(q, k, g, f, impl="pallas", chunk_size=chunk, segment_ids=seg,
                                   **kw)
            return jnp.sum(s * w), s

        (_, s), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            q, k, g, f)
        out.append((s, grads))
    return out


def _check(out, tol, seed):
    (s_d, g_d), (s_p, g_p) = out
    assert rel_err(s_p, s_d) <= tol, seed
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), g_p, g_d):
        assert rel_err(a, b) <= tol, (name, seed)


# (B, T, D, chunk, block, sharpness, gamma scale): T not a multiple of the chunk, T = 1,
# T below the chunk, several key tiles a chunk (block < chunk), tiles across chunk edges
# (block > chunk), gamma near +-0.999.
CASES = [
    (2, 37, 8, 16, 8, 1.0, 1.0),
    (1, 1, 4, 8, 8, 1.0, 1.0),
    (1, 21, 6, 4, 8, 3.0, 30.0),
    (2, 9, 8, 16, 16, 0.05, 30.0),
    (1, 37, 6, 8, 16, 1.0, 3.0),
]


@pytest.mark.parametrize("B,T,D,chunk,block,sharp,gscale", CASES)
def test_pallas_equals_dense_float64(B, T, D, chunk, block, sharp, gscale, x64):
    seed = _seed()
    args = _inputs(seed, B, T, D, sharp, gscale)
    _check(_both(args, chunk, block=block), 1e-9, seed)


def test_pallas_equals_dense_float32_no_saved_inverses():
    seed = _seed()
    args = _inputs(seed, 2, 27, 8)
    _check(_both(args, 8, keep_inverses=False, inverse="solve"), 1e-4, seed)


def test_pallas_segments_float64(x64):
    """Packed documents: a boundary inside a chunk, one on a chunk edge, trailing padding."""
    seed = _seed()
    B, T = 2, 29
    args = _inputs(seed, B, T, 6)
    ids = np.zeros((B, T), np.int32)
    ids[0, :5], ids[0, 5:16], ids[0, 16:] = 1, 2, 3
    ids[1, :24], ids[1, 24:] = 1, 0
    _check(_both(args, 8, seg=jnp.asarray(ids)), 1e-9, seed)


def test_pallas_config_accepts_impl():
    from sessa_jax.models.config import SessaConfig

    assert SessaConfig(d_model=64, n_heads=4, feedback_impl="pallas").feedback_impl == "pallas"
    with pytest.raises(ValueError, match="pallas"):
        SessaConfig(d_model=64, n_heads=4, feedback_impl="triton")


def test_layer_with_pallas_matches_reference_fixture(x64):
    """The whole layer with feedback_impl="pallas" against the author's implementation
    (output and input gradient), through the config's dispatch."""
    from conftest import FIXTURES, fixture_config
    from sessa_jax.interop import layer_from_reference, load_reference_state
    from flax import nnx

    path = FIXTURES[0]
    cfg = fixture_config(path, feedback_impl="pallas", chunk_size=8, dtype="float64",
                         param_dtype="float64")
    z = np.load(path)
    layer = layer_from_reference(load_reference_state(path), cfg)
    x, w = jnp.asarray(z["x"]), jnp.asarray(z["w_loss"])
    graphdef, state = nnx.split(layer)
    loss = lambda x: jnp.sum(nnx.merge(graphdef, state)(x) * w)
    y = jax.jit(lambda x: nnx.merge(graphdef, state)(x))(x)
    gx = jax.jit(jax.grad(loss))(x)
    assert rel_err(y, z["y"]) <= 1e-9
    assert rel_err(gx, z["grad/x"]) <= 1e-9


def test_gpu_backend_needs_d_multiple_of_16(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, g, f, _ = _inputs(0, 1, 4, 4)
    with pytest.raises(ValueError, match="multiple of 16.*chunked"):
        feedback_solve(q, k, g, f, impl="pallas")


# The GPU (Triton) design in interpret mode: (B, T, D, chunk, segments). Several chunks with T
# off the chunk grid and packed documents; T = 1; a width of two slices (80 = 64 + 16).
GPU_CASES = [(2, 53, 32, 16, True), (1, 1, 16, 16, False), (1, 40, 80, 32, False)]


@pytest.mark.parametrize("B,T,D,chunk,use_seg", GPU_CASES)
def test_gpu_kernels_equal_dense_float64(B, T, D, chunk, use_seg, x64):
    seed = _seed()
    args = _inputs(seed, B, T, D)
    seg = None
    if use_seg:
        ids = np.zeros((B, T), np.int32)
        ids[0, 7:30], ids[0, 30:] = 1, 2  # a boundary inside a chunk, one off the grid
        ids[1, 16:] = 1  # one on a chunk edge
        seg = jnp.asarray(ids)
    _check(_both(args, chunk, seg=seg, kernels="gpu", block=256), 1e-9, seed)


def test_gpu_kernels_split_columns_over_groups(monkeypatch, x64):
    """A width past the register budget is split into column groups (scores recomputed per
    group): forced here with a tiny budget, 64 columns in 4 groups of 16."""
    from sessa_jax.ops import feedback_pallas_gpu as gpu

    monkeypatch.setattr(gpu, "ACC_BUDGET", 256)
    assert gpu.tiles(32, 64) == (16, 16)
    seed = _seed()
    _check(_both(_inputs(seed, 1, 45, 64), 16, kernels="gpu", block=256), 1e-9, seed)


def test_gpu_kernels_loop_tile_wider_than_program_tile(monkeypatch, x64):
    """LOOP_TILE: the side a program loops over in tiles of 32 while it owns 16 rows/keys
    (budget forced down), T off the grid, packed documents."""
    from sessa_jax.ops import feedback_pallas_gpu as gpu

    monkeypatch.setattr(gpu, "ACC_BUDGET", 512)
    monkeypatch.setattr(gpu, "LOOP_TILE", 32)
    assert gpu.tiles(32, 48) == (16, 48) and gpu.loop_tile(32, 16) == 32
    seed = _seed()
    B, T = 2, 70
    ids = np.zeros((B, T), np.int32)
    ids[0, 20:45], ids[0, 45:] = 1, 2
    _check(_both(_inputs(seed, B, T, 48), 32, seg=jnp.asarray(ids), kernels="gpu", block=256),
           1e-9, seed)


def test_gpu_kernels_split_loops_over_programs(monkeypatch, x64):
    """MIN_PROGRAMS: the forward, rhs and dk loops split over several programs and merged
    after (the forward's online-softmax states included), with packed documents so that some
    parts see no key."""
    from sessa_jax.ops import feedback_pallas_gpu as gpu

    monkeypatch.setattr(gpu, "MIN_PROGRAMS", 24)
    assert gpu.splits(4, 5) == 5 and gpu.splits(4, 100) == 6 and gpu.splits(30, 9) == 1
    seed = _seed()
    B, T = 2, 90
    ids = np.zeros((B, T), np.int32)
    ids[0, 40:], ids[1, 10:70], ids[1, 70:] = 1, 1, 2
    _check(_both(_inputs(seed, B, T, 32), 32, seg=jnp.asarray(ids), kernels="gpu", block=256),
           1e-9, seed)


def test_gpu_tiles_for_model_widths():
    """The tiles the GPU kernels take at the widths of the model configs: all D columns in
    registers up to D = 2048 (3 x 256 at D = 768, 864 without padding), groups beyond."""
    from sessa_jax.ops.feedback_pallas_gpu import pieces, tiles

    assert tiles(2048, 768) == (32, 768) and pieces(768) == ((0, 256), (256, 256), (512, 256))
    assert tiles(2048, 864) == (32, 864)
    assert [w for _, w in pieces(864)] == [256, 256, 256, 64, 32]
    assert tiles(512, 2048) == (16, 2048)
    bm, dg = tiles(512, 4864)
    assert (bm, 4864 % dg, bm * dg <= 32768) == (16, 0, True)
    assert sum(w for _, w in pieces(dg)) == dg
    with pytest.raises(ValueError, match="multiples of 16"):
        tiles(24, 768)


@pytest.mark.parametrize("dtype,variant", [("bfloat16", None), ("float32", None),
                                           ("bfloat16", (64, 264))])
def test_gpu_lowering_uses_the_triton_kernels(dtype, variant, monkeypatch):
    """Lowered for CUDA from this CPU host, the solve's forward and backward hold the four
    Triton kernels (no Mosaic): what a GPU compiles. At the 125M width (D = 864: slices of
    256, 256, 256, 64, 32) with T off the chunk grid; also with the untimed variants
    (LOOP_TILE 64, loops split to reach 264 programs)."""
    import re

    from sessa_jax.ops import feedback_pallas_gpu as gpu

    if variant:
        monkeypatch.setattr(gpu, "LOOP_TILE", variant[0])
        monkeypatch.setattr(gpu, "MIN_PROGRAMS", variant[1])
    B, T, D = 2, 300, 864
    dt = getattr(jnp, dtype)

    def loss(q, k, g, f):
        s = feedback_solve(q, k, g, f, impl="pallas", chunk_size=128)
        return jnp.sum(s.astype(jnp.float32) ** 2)

    args = [jax.ShapeDtypeStruct((B, T, D), dt)] * 2 + [
        jax.ShapeDtypeStruct((B, T), jnp.float32), jax.ShapeDtypeStruct((B, T, D), dt)]
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    names = sorted(set(re.findall(r'name = "(sessa_feedback_\w+)"', text)))
    assert names == ["sessa_feedback_cross_gpu", "sessa_feedback_dk_gpu",
                     "sessa_feedback_dq_gpu", "sessa_feedback_rhs_gpu"], names
    assert "xla.gpu.triton" in text and "mosaic" not in text.lower()


_SPREAD = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from sessa_jax.models.partitioning import DEFAULT_RULES, activation_sharding, spread_rows
mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
x = jnp.ones((4, 3))
def run(kernel):
    def f(x):
        with activation_sharding(mesh, DEFAULT_RULES):
            return spread_rows(lambda a: a * a.shape[0], x, kernel=kernel)
    return np.asarray(jax.jit(f)(x))[0, 0]
print("ROWS", run(False), run(True))
"""


def test_spread_rows_puts_kernels_under_shard_map():
    """Mosaic kernels cannot be auto-partitioned: with kernel=True (feedback_impl="pallas")
    the solve runs under shard_map over the batch axes even on a pure data-parallel mesh,
    where the other impls run as plain code (each device sees 2 of the 4 rows)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    p = subprocess.run([sys.executable, "-c", _SPREAD], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ROWS 4.0 2.0" in p.stdout, p.stdout


def test_kernels_compile_for_tpu_ahead_of_time():
    """The kernels lower through Mosaic: AOT for TPU v5e from this CPU host (libtpu, no TPU),
    fwd+bwd in bf16 with segment ids, a chunk below 128 rows and T off the tile grid (bigger
    shapes: scripts/aot_feedback_pallas.py)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "XLA_FLAGS"))}
    p = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "aot_feedback_pallas.py"), "--topology",
         "v5e:2x2", "--T", "500", "--D", "256", "--c", "64", "--dtypes", "bfloat16", "--seg"],
        capture_output=True, text=True, timeout=300, env=env, cwd=root)
    out = p.stdout + p.stderr
    assert "no TPU topology" not in out, "libtpu missing or topology API failed:\n" + out
    assert p.returncode == 0 and out.count("OK  v5e") == 2, out[-3000:]


def test_gpu_check_script_runs_small_cases_on_cpu():
    """scripts/check_feedback_gpu.py (the on-device check of the kernels against dense in
    float64) in its smoke mode on this CPU: its error arithmetic passes, and it names each case."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, os.path.join(root, "scripts", "check_feedback_gpu.py"),
                        "--small"], capture_output=True, text=True, timeout=300, env=env,
                       cwd=root)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert p.stdout.count("  ok\n") == 4 and "all ok" in p.stdout, p.stdout
