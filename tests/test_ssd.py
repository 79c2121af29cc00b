"""Mamba-2 (SSD): the chunked matmul form against the sequential recurrence (float64, forward and
gradients), document resets against running the pieces alone, the block's cached decoding
against the full sequence, bf16 under jit, parameter counts and config errors. Tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sessa_jax.generate import generate, pad_prompts
from sessa_jax.models import DecoderLM, Mamba2Block, Mamba2Cache, Mamba2Config, ModelConfig
from sessa_jax.models.lm import count_params
from sessa_jax.models.sizing import abstract_param_count, param_count
from sessa_jax.ops.ssd import causal_conv, ssd_chunked, ssd_reference, ssd_step
from sessa_jax.train.metrics import flops_per_token

from conftest import rel_err


def _inputs(seed, B, T, H=4, P=3, G=2, N=5, with_h0=True, p_reset=0.0, dtype=jnp.float64):
    """Random SSD inputs (NumPy's generator: jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    x = f(B, T, H, P)
    dt = jax.nn.softplus(f(B, T, H) - 0.5)
    A = -jnp.exp(f(H))
    Bm, Cm = f(B, T, G, N), f(B, T, G, N)
    D = f(H)
    h0 = f(B, H, P, N) if with_h0 else None
    resets = jnp.asarray(rng.random((B, T)) < p_reset) if p_reset else None
    return (x, dt, A, Bm, Cm, D, h0), resets


# T odd and not a multiple of the chunk / T = 1 / a multiple; resets, h0, groups.
CASES = [
    dict(T=7, Q=3, with_h0=True, p_reset=0.3, G=2),
    dict(T=1, Q=4, with_h0=True, p_reset=0.0, G=1),
    dict(T=8, Q=4, with_h0=False, p_reset=0.25, G=4),
]


def _fwd_and_grads(fn, args, resets):
    """One jitted call: y, final state, and the gradients of a random linear read-out of both
    with respect to every array input."""
    n = sum(a is not None for a in args)
    Bsz, T, H, P = args[0].shape
    rng = np.random.default_rng(0)  # the read-out weights: drawn outside the traced function
    wy = rng.standard_normal((Bsz, T, H, P))
    wh = rng.standard_normal((Bsz, H, P, args[3].shape[-1]))

    def run(*a):
        (y, h), vjp = jax.vjp(lambda *v: fn(*v, *([None] * (len(args) - n)), resets), *a)
        return y, h, vjp((jnp.asarray(wy, y.dtype), jnp.asarray(wh, h.dtype)))

    return jax.jit(run)(*args[:n])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{T}-Q{Q}-G{G}".format(**c))
def test_chunked_matches_sequential_forward_and_grads(x64, case):
    args, resets = _inputs(case["T"], 2, case["T"], G=case["G"],
                           with_h0=case["with_h0"], p_reset=case["p_reset"])
    ref = lambda *a: ssd_reference(*a[:-1], resets=a[-1])
    chk = lambda *a: ssd_chunked(*a[:-1], resets=a[-1], chunk_size=case["Q"])
    y_ref, h_ref, g_ref = _fwd_and_grads(ref, args, resets)
    y, h, g = _fwd_and_grads(chk, args, resets)
    assert y.dtype == jnp.float64 and y.shape == args[0].shape and h.shape == h_ref.shape
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(h, h_ref) <= 1e-12
    for i, (a, b) in enumerate(zip(g, g_ref)):  # x, dt, A, B, C, D (, h0)
        assert rel_err(a, b) <= 1e-10, i


def test_reference_is_the_documented_recurrence(x64):
    """The reference against a NumPy loop of h_t = exp(dt A) h + dt x B^T, y = h C + D x,
    and against ssd_step, one token at a time."""
    (x, dt, A, Bm, Cm, D, h0), _ = _inputs(3, 2, 4)
    y, hT = jax.jit(ssd_reference)(x, dt, A, Bm, Cm, D, h0)
    step = jax.jit(ssd_step)
    xn, dtn, An, Bn, Cn, Dn, h = map(np.asarray, (x, dt, A, Bm, Cm, D, h0))
    Bh, Ch = np.repeat(Bn, 2, axis=2), np.repeat(Cn, 2, axis=2)  # 4 heads in 2 groups
    hs = h0
    for t in range(4):
        h = (np.exp(dtn[:, t] * An)[..., None, None] * h
             + (dtn[:, t, :, None] * xn[:, t])[..., None] * Bh[:, t, :, None, :])
        y_t = np.einsum("bhpn,bhn->bhp", h, Ch[:, t]) + Dn[:, None] * xn[:, t]
        assert rel_err(y[:, t], y_t) <= 1e-12
        ys, hs = step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D, hs)
        assert rel_err(ys, y_t) <= 1e-12
    assert rel_err(hT, h) <= 1e-12 and rel_err(hs, h) <= 1e-12


def _pieces(v, bounds, T):
    """Row 0 of v (1, T, ...) cut at bounds, each piece left-aligned in a zero row of length T
    -> (n_pieces, T, ...). Zero dt after a piece is the identity step, so each row's final
    state is its piece's; zeros in the conv input equal a fresh (zero) history."""
    rows = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows.append(jnp.pad(v[0, a:b], ((0, T - (b - a)),) + ((0, 0),) * (v.ndim - 2)))
    return jnp.stack(rows)


def test_resets_equal_running_the_pieces_alone(x64):
    """A reset at t: outputs from t on are those of the piece [t, next reset) run from a zero
    state (the first piece from h0); the final state is the last piece's. The conv too."""
    T, cuts = 11, (4, 5, 9)  # pieces of 4, 1, 4, 2 tokens; chunk 3 so resets fall mid-chunk
    bounds = (0,) + cuts + (T,)
    (x, dt, A, Bm, Cm, D, h0), _ = _inputs(5, 1, T)
    resets = jnp.zeros((1, T), bool).at[0, list(cuts)].set(True)
    y, hT = jax.jit(lambda *a: ssd_chunked(*a, resets=resets, chunk_size=3))(
        x, dt, A, Bm, Cm, D, h0)
    n = len(bounds) - 1
    h0s = jnp.zeros((n,) + h0.shape[1:], h0.dtype).at[0].set(h0[0])
    pieces = [_pieces(v, bounds, T) for v in (x, dt, Bm, Cm)]
    yp, hp = jax.jit(ssd_reference)(pieces[0], pieces[1], A, pieces[2], pieces[3], D, h0s)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert rel_err(y[0, a:b], yp[i, : b - a]) <= 1e-12, i
    assert rel_err(hT[0], hp[-1]) <= 1e-12

    rng = np.random.default_rng(6)
    w, bias, u, hist = (jnp.asarray(rng.standard_normal(s)) for s in ((4, 6), (6,), (1, T, 6),
                                                                       (1, 3, 6)))
    conv = causal_conv(u, w, bias, resets, history=hist)
    # the first piece reads the history, later ones start from zeros
    hists = jnp.zeros((n, 3, 6), hist.dtype).at[0].set(hist[0])
    cp = causal_conv(_pieces(u, bounds, T), w, bias, history=hists)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert rel_err(conv[0, a:b], cp[i, : b - a]) <= 1e-12, i
    # no history (training's form: shifted taps, no copy) equals a zero history, T = 1 too
    for v, r in ((u, resets), (u[:, :1], resets[:, :1])):
        zero = jnp.zeros((1, 3, 6), v.dtype)
        assert rel_err(causal_conv(v, w, bias, r), causal_conv(v, w, bias, r, zero)) <= 1e-15


def test_bf16_operands_float32_state():
    """bf16 x, B, C (the training dtype): float32 outputs and state, within bf16 rounding of the
    float32 reference on the same (rounded) inputs."""
    (x, dt, A, Bm, Cm, D, h0), r = _inputs(11, 2, 40, p_reset=0.1, dtype=jnp.float32)
    bf = lambda a: a.astype(jnp.bfloat16)
    args = (bf(x), dt, A, bf(Bm), bf(Cm), D, h0)
    y, h = jax.jit(lambda *a: ssd_chunked(*a, resets=r, chunk_size=16))(*args)
    y_ref, h_ref = jax.jit(lambda *a: ssd_reference(*a, resets=r))(*args)
    assert y.dtype == h.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-2 and rel_err(h, h_ref) <= 1e-2  # measured: 2e-3, 1e-3


# ------------------------------------------------------------------------ the block


def _cfg(**kw):
    # dt in [0.1, 1] so that the SSM's part of the output is not negligible at init
    base = dict(d_model=16, d_state=4, expand=2, head_dim=8, ngroups=2, chunk_size=3,
                dt_min=0.1, dt_max=1.0, dtype="float64", param_dtype="float64")
    return Mamba2Config(**{**base, **kw})


def _mix(y, x):
    return y - x  # the block's own output, without the residual that would hide errors


def test_block_chunked_matches_sequential_and_resets_split_documents(x64):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 16)))
    chunked = Mamba2Block(_cfg(), rngs=nnx.Rngs(0))
    seq = Mamba2Block(_cfg(scan_impl="sequential"), rngs=nnx.Rngs(0))
    call = jax.jit(lambda m, v, r: m(v, resets=r))
    resets = jnp.zeros((1, 8), bool).at[0, 3].set(True)
    y_r = call(chunked, x, resets)
    assert y_r.shape == x.shape and y_r.dtype == jnp.float64
    assert rel_err(y_r - x, call(seq, x, resets) - x) <= 1e-10
    # the two documents alone, as the rows of one batch (right-padded: causal, so the
    # padding after a document does not reach it)
    bounds = (0, 3, 8)
    alone = call(chunked, _pieces(x, bounds, 8), jnp.zeros((2, 8), bool))
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert rel_err(y_r[0, a:b] - x[0, a:b], alone[i, : b - a] - x[0, a:b]) <= 1e-10, i


def test_prefill_then_decode_matches_full_and_padding(x64):
    block = Mamba2Block(_cfg(), rngs=nnx.Rngs(2))
    B, T, P = 3, 7, 4
    x = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, 16)))
    y_full = jax.jit(lambda m, v: m(v))(block, x)
    cache = block.init_cache(B, max_len=T)
    assert isinstance(cache, Mamba2Cache)
    assert cache.conv.shape == (B, 3, 32 + 2 * 2 * 4) and cache.ssm.shape == (B, 4, 8, 4)
    # right-padded prompts of lengths P, 2, 1 (shorter than the conv window), garbage in the pad
    lengths = jnp.array([P, 2, 1], jnp.int32)
    pad = jnp.arange(P)[None, :, None] >= lengths[:, None, None]
    prompt = jnp.where(pad, 1e3, x[:, :P])
    y_pre, cache = jax.jit(lambda m, v, c, n: m.prefill(v, c, n))(block, prompt, cache, lengths)
    np.testing.assert_array_equal(cache.pos, lengths)
    for b in range(B):
        L = int(lengths[b])
        assert rel_err(_mix(y_pre[b, :L], x[b, :L]),
                       _mix(y_full[b, :L], x[b, :L])) <= 1e-10, b
    # then each row continues with its own next tokens, one at a time
    step = jax.jit(lambda m, v, c: m.decode_step(v, c))
    pos = np.asarray(lengths)
    while pos.min() < T:
        idx = np.minimum(pos, T - 1)
        x_t = x[jnp.arange(B), idx][:, None]
        y_t, cache = step(block, x_t, cache)
        for b in range(B):
            if pos[b] < T:
                assert rel_err(_mix(y_t[b, 0], x_t[b, 0]),
                               _mix(y_full[b, pos[b]], x_t[b, 0])) <= 1e-10, (b, pos[b])
        pos = pos + 1


def test_bf16_block_under_jit():
    """bf16 compute, f32 parameters: the block's loss and gradients are finite under jit and
    its SSM state stays float32 while the conv history is bf16."""
    block = Mamba2Block(_cfg(dtype="bfloat16", param_dtype="float32"), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 10, 16)), jnp.bfloat16)
    gd, params = nnx.split(block)

    def loss(p, v):
        y = nnx.merge(gd, p)(v)
        assert y.dtype == jnp.bfloat16
        return jnp.mean(y.astype(jnp.float32) ** 2)

    val, grads = jax.jit(jax.value_and_grad(loss))(params, x)
    assert np.isfinite(float(val))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    cache = block.init_cache(2, 10)
    assert cache.ssm.dtype == jnp.float32 and cache.conv.dtype == jnp.bfloat16


def test_generate_matches_the_full_forward():
    """sessa_jax.generate (jitted prefill of right-padded prompts + decode loop) on a mamba2
    DecoderLM: greedy tokens equal re-running the full forward at each step."""
    cfg = ModelConfig(family="mamba2", vocab_size=32, d_model=32, n_layers=1, d_state=8,
                      ssd_head_dim=16, ssd_chunk_size=4, tie_embeddings=False)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    prompts_list = [[1, 7, 9, 11, 13], [1, 20, 21]]
    prompts, lengths = pad_prompts(prompts_list)
    out = np.asarray(generate(model, prompts, lengths, max_new_tokens=3, greedy=True)["tokens"])
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda s, v: nnx.merge(gd, s)(v))
    for b, p in enumerate(prompts_list):
        buf = np.zeros((1, 8), np.int32)
        buf[0, : len(p)] = p
        for i in range(3):
            buf[0, len(p) + i] = int(jnp.argmax(fwd(st, jnp.asarray(buf))[0, len(p) + i - 1]))
        assert out[b].tolist() == buf[0, len(p) : len(p) + 3].tolist(), b


# ------------------------------------------------------------------------ sizing, config


@pytest.mark.parametrize("kw", [dict(), dict(mlp_ratio=1.5, tie_embeddings=False),
                                dict(ssd_ngroups=2, d_state=6, expand=3, d_conv=3,
                                     num_classes=4)], ids=("base", "mlp-untied", "groups"))
def test_param_count_is_exact(kw):
    cfg = ModelConfig(**{**dict(family="mamba2", vocab_size=40, d_model=32, n_layers=2,
                                ssd_head_dim=16), **kw})
    assert param_count(cfg) == abstract_param_count(cfg)
    if not kw:
        assert param_count(cfg) == count_params(DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert flops_per_token(cfg, 64) > 6 * param_count(cfg)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ssd_head_dim=48 does not divide d_inner"):
        ModelConfig(family="mamba2", d_model=40, ssd_head_dim=48)
    with pytest.raises(ValueError, match="ssd_ngroups=3 does not divide the 2 heads"):
        ModelConfig(family="mamba2", d_model=64, ssd_ngroups=3)
    with pytest.raises(ValueError, match="ssd_chunk_size=0"):
        ModelConfig(family="mamba2", d_model=64, ssd_chunk_size=0)
    with pytest.raises(ValueError, match="ssd_impl='fast'"):
        ModelConfig(family="mamba2", d_model=64, ssd_impl="fast")
    with pytest.raises(ValueError, match="head_dim=5 does not divide"):
        Mamba2Config(d_model=16, head_dim=5)
    # fields of other families do not constrain this one (no n_heads divisibility)
    assert ModelConfig(family="mamba2", d_model=96, n_heads=5).block_config().n_heads == 3


def test_hf_export_refuses_mamba2(tmp_path):
    """The Hugging Face modeling file has no Mamba-2 block: a clear refusal, not a wrong model
    (the native format exports any family)."""
    from sessa_jax.export.core import ExportError
    from sessa_jax.export.hf import export_hf, hf_config

    cfg = ModelConfig(family="mamba2", vocab_size=40, d_model=32, n_layers=1, ssd_head_dim=16)
    for call in (lambda: hf_config(cfg), lambda: export_hf({}, cfg, str(tmp_path / "hf"))):
        with pytest.raises(ExportError, match="family='mamba2'.*native format"):
            call()
    assert not (tmp_path / "hf").exists()
