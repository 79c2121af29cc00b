"""Document boundaries (segment_ids) inside every op and model family: a packed row of several
documents gives each document exactly the outputs and gradients of that document run alone.

Op level (float64): the chunked feedback solve equals the dense one with ids, blocked attention
(and splash in interpret mode) equal the masked reference, the SSM scans equal the sequential
one with resets. Model level (float32, 1e-5): sessa (dense and chunked), transformer, mamba,
mamba2.
Step level: a packed text batch's loss is the sum of its documents' losses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from sessa_jax.ops.attention import attention_reference, blocked_attention, causal_attention
from sessa_jax.ops.attention import splash_attention
from sessa_jax.ops.feedback import feedback_dense, feedback_solve
from sessa_jax.ops.segments import segment_positions, segment_starts, visible
from sessa_jax.ops.ssm import selective_scan


def _ids(lengths, pad=0):
    """Segment ids 1, 2, ... for documents of ``lengths``, then ``pad`` zeros: (T,) int32."""
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
    return ids.astype(np.int32)


# Two rows: a length-1 document, lengths that no chunk/block size below divides, a document
# that fills whole key blocks (rows with nothing visible in block 0), trailing padding (id 0).
SEG = jnp.asarray(np.stack([_ids([7, 1, 9, 4, 2], pad=0), _ids([1, 12, 5, 3], pad=2)]))
T = SEG.shape[1]  # 23


def _seed():
    return int(np.random.SeedSequence().generate_state(1)[0] % 2**31)  # fresh every run


def test_segment_helpers_match_packing():
    """ops.segments' positions are the ones packing emits (on real tokens), starts included."""
    from sessa_jax.data.packing import PackedRows

    docs = [np.arange(5), np.arange(2), np.arange(1), np.arange(9), np.arange(3)]
    lengths = [len(d) for d in docs]
    rows = PackedRows(lengths, np.ones(len(docs), bool), lambda i: docs[i], seq_len=6, pad_id=0)
    for r in range(len(rows)):
        ex = rows.example(r)
        seg = jnp.asarray(ex["segment_ids"])[None]
        real = ex["segment_ids"] > 0
        np.testing.assert_array_equal(np.asarray(segment_positions(seg))[0][real],
                                      ex["positions"][real])
        starts = np.asarray(segment_starts(seg))[0]
        np.testing.assert_array_equal(starts[1:], ex["segment_ids"][1:] != ex["segment_ids"][:-1])
        assert not starts[0]
    t = jnp.arange(4)
    s = jnp.asarray([[1, 1, 2, 2]])
    assert np.asarray(visible(t, t, s, s, strict=True))[0].astype(int).tolist() == [
        [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]


# ------------------------------------------------------------------ ops


def _fb_inputs(seed, B, T, D):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, D))
    k = jax.random.normal(ks[1], (B, T, D))
    f = jax.random.normal(ks[2], (B, T, D))
    g = 0.999 * jnp.tanh(3.0 * jax.random.normal(ks[3], (B, T)))
    w = jax.random.normal(ks[4], (B, T, D))
    return q, k, g, f, w


def _docs_of_row0():
    """(start, stop) of each segment of SEG's row 0."""
    bounds = np.flatnonzero(np.diff(np.asarray(SEG[0]), prepend=-1, append=-1))
    return list(zip(bounds[:-1], bounds[1:]))


def _alone(x, spans, width):
    """Row 0's segments of x (1, T, ...) as their own rows, right-padded to ``width``: a causal
    op gives each its run-alone result on the first ``stop - start`` positions (padding comes
    after), and one call serves every length."""
    pad = lambda a: jnp.pad(a, [(0, width - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return jnp.stack([pad(x[0, a:b]) for a, b in spans])


def test_feedback_chunked_equals_dense_with_segments(x64):
    """4-row chunks over T=23 (padded to 24; 3 scan segments), both paths and their grads."""
    seed = _seed()
    q, k, g, f, w = _fb_inputs(seed, 2, T, 6)

    def run(impl):
        solve = lambda q, k, g, f: feedback_solve(
            q, k, g, f, impl=impl, chunk_size=4, segments=8, segment_ids=SEG)
        s, vjp = jax.vjp(solve, q, k, g, f)
        return s, vjp(w)

    s_d, g_d = jax.jit(lambda: run("dense"))()
    s_c, g_c = jax.jit(lambda: run("chunked"))()
    assert rel_err(s_c, s_d) <= 1e-9, seed
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), g_c, g_d):
        assert rel_err(a, b) <= 1e-9, (name, seed)
    # block diagonal: each document of row 0 is the dense solve of that document alone
    spans = _docs_of_row0()
    alone = jax.jit(feedback_dense)(*(_alone(a, spans, 9) for a in (q, k, g, f)))
    for i, (a, b) in enumerate(spans):
        assert rel_err(s_d[0, a:b], alone[i, :b - a]) <= 1e-12, (a, b)
    # the first token of every segment reads nothing: s_t = f_t
    first = np.flatnonzero(np.asarray(segment_positions(SEG)) == 0)
    np.testing.assert_allclose(np.asarray(s_c).reshape(-1, 6)[first],
                               np.asarray(f).reshape(-1, 6)[first], rtol=0, atol=1e-12)


def _attn_inputs(seed, B, T, H, Hkv, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, d), dtype),
            jax.random.normal(ks[1], (B, T, Hkv, d), dtype),
            jax.random.normal(ks[2], (B, T, Hkv, d), dtype),
            jax.random.normal(ks[3], (B, T, H, d), dtype))


def _seg_ref(q, k, v, seg):
    t = jnp.arange(q.shape[1])
    return attention_reference(q, k, v, visible(t, t, seg, seg)[:, None])


def _check_attention(fn, q, k, v, w, seg, tol):
    def out_and_grads(fn):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return o, vjp(w)

    got, g_got = jax.jit(lambda: out_and_grads(fn))()
    want, g_want = jax.jit(lambda: out_and_grads(_seg_ref))()
    assert rel_err(got, want) < tol, rel_err(got, want)
    for name, a, b in zip("qkv", g_got, g_want):
        assert np.all(np.isfinite(np.asarray(a))), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_blocked_attention_equals_reference_with_segments(x64):
    q, k, v, w = _attn_inputs(_seed(), 2, T, 4, 2, 8, jnp.float64)
    blocked = lambda q, k, v, s: blocked_attention(q, k, v, block_size=5, segment_ids=s)
    _check_attention(blocked, q, k, v, w, SEG, 1e-10)


def test_xla_attention_with_segments_float32():
    """The "xla" baseline takes the ids as a mask. ("auto", the blocked path on CPU, is what
    the model tests below run.)"""
    q, k, v, _ = _attn_inputs(3, 2, T, 2, 1, 8, jnp.float32)
    got = jax.jit(lambda *a: causal_attention(*a, impl="xla", segment_ids=SEG))(q, k, v)
    assert rel_err(got, _seg_ref(q, k, v, SEG)) < 1e-5


def test_splash_interpret_with_segments():
    """The TPU kernel (Pallas interpret mode) with SegmentIds, T=23 padded to one 128 block."""
    q, k, v, w = _attn_inputs(7, 2, T, 2, 1, 16, jnp.float32)
    splash = lambda q, k, v, s: splash_attention(q, k, v, interpret=True, segment_ids=s)
    _check_attention(splash, q, k, v, w, SEG, 1e-4)


def test_ssm_scans_agree_with_resets(x64):
    """Every scan with resets equals the sequential one (values, final state, gradients), and
    the sequential one equals each document scanned alone."""
    B, E, N = 2, 3, 4
    ks = jax.random.split(jax.random.key(_seed()), 8)
    x = jax.random.normal(ks[0], (B, T, E))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, E)) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[2], (E, N)))
    Bm, Cm = (jax.random.normal(kk, (B, T, N)) for kk in ks[3:5])
    Dskip = jax.random.normal(ks[5], (E,))
    h0 = jax.random.normal(ks[6], (B, E, N))
    w = jax.random.normal(ks[7], (B, T, E))

    @jax.jit
    def run(x, dt, Bm, Cm, h0):
        out = {}
        for impl, chunk in (("sequential", 1), ("associative", 1), ("chunked", 3)):
            scan = lambda *a: selective_scan(*a[:2], A, *a[2:4], Dskip, a[4], impl=impl,
                                             chunk_size=chunk, segment_ids=SEG)
            (y, h), vjp = jax.vjp(scan, x, dt, Bm, Cm, h0)
            out[impl, chunk] = y, h, vjp((w, jnp.ones_like(h)))
        return out

    out = run(x, dt, Bm, Cm, h0)
    y_ref, h_ref, g_ref = out["sequential", 1]
    for key, (y, h, g) in out.items():
        assert rel_err(y, y_ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10, key
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) <= 1e-10, key
    # row 0: every document after the first is its own scan from a zero state (the first
    # continues h0); the final state is the last document's
    spans = _docs_of_row0()
    x_a, dt_a, B_a, C_a = (_alone(a, spans, 9) for a in (x, dt, Bm, Cm))
    h_a = jnp.concatenate([h0[:1], jnp.zeros((len(spans) - 1, E, N))])
    y_a, h_last = jax.jit(functools.partial(selective_scan, impl="sequential"))(
        x_a, dt_a, A, B_a, C_a, Dskip, h_a)
    for i, (a, b) in enumerate(spans):
        assert rel_err(y_ref[0, a:b], y_a[i, :b - a]) <= 1e-12, (a, b)
    assert rel_err(h_ref[0], h_last[-1]) <= 1e-12  # pads (dt = 0) leave the state as it is


# ------------------------------------------------------------------ models

# Documents of lengths 7, 1 and 5, packed in three layouts (the cyclic orders) with trailing
# padding: each appears once per row. Sessa's chunk of 3 divides none of the lengths. One
# layer: the block (mixer, MLP, remat) is what composes; more would only add compile time.
DOC_LENS = (7, 1, 5)
LAYOUTS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))
PAD = 2
MODELS = {
    "sessa-dense": dict(family="sessa", feedback_impl="dense"),
    "sessa-chunked": dict(family="sessa", feedback_impl="chunked", chunk_size=3, remat="full"),
    "transformer": dict(family="transformer", remat="dots"),
    "mamba": dict(family="mamba", chunk_size=3, remat="full"),
    "mamba2": dict(family="mamba2", ssd_chunk_size=3, ssd_head_dim=8, remat="full"),
}


def _batches(rng):
    """(packed, alone): dicts of tokens, targets, mask, seg, each (3, 15). Alone row i holds
    document i at its start, then padding in the same segment: causality keeps the padding
    out of the document, so the row is the document run alone."""
    docs = [rng.integers(0, 32, n).astype(np.int32) for n in DOC_LENS]
    targets = [rng.integers(0, 32, n).astype(np.int32) for n in DOC_LENS]
    width = sum(DOC_LENS) + PAD
    pad = lambda a: np.pad(a, (0, width - len(a)))
    packed = {
        "tokens": [pad(np.concatenate([docs[i] for i in l])) for l in LAYOUTS],
        "targets": [pad(np.concatenate([targets[i] for i in l])) for l in LAYOUTS],
        "seg": [_ids([DOC_LENS[i] for i in l], pad=PAD) for l in LAYOUTS],
    }
    packed["mask"] = [s > 0 for s in packed["seg"]]
    alone = {"tokens": [pad(d) for d in docs], "targets": [pad(t) for t in targets],
             "seg": [np.ones(width, np.int32)] * 3,
             "mask": [np.arange(width) < n for n in DOC_LENS]}
    stack = lambda d: {k: jnp.asarray(np.stack(v)) for k, v in d.items()}
    return stack(packed), stack(alone)


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_row_equals_documents_alone(name):
    """Logits and parameter gradients of a packed batch are those of its documents alone.

    One compiled value-and-grad serves both batches (the alone rows are one segment each),
    and a forward pass without ids checks that one segment is the plain model.
    """
    from sessa_jax.models import DecoderLM, ModelConfig

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_ratio=1.0,
                      d_state=4, **MODELS[name])
    graphdef, params, rest = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    model = lambda p, tokens, seg: nnx.merge(graphdef, p, rest)(tokens, segment_ids=seg)

    @jax.jit
    def run(p, b):
        def loss(p):
            logits = model(p, b["tokens"], b["seg"])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)
            return jnp.sum(jnp.where(b["mask"], nll[..., 0], 0.0)), logits
        return jax.value_and_grad(loss, has_aux=True)(p)

    packed, alone = _batches(np.random.default_rng(1))
    (loss_p, logits_p), g_p = run(params, packed)
    (loss_a, logits_a), g_a = run(params, alone)
    plain = jax.jit(lambda p, tokens: model(p, tokens, None))(params, alone["tokens"])
    np.testing.assert_allclose(plain, logits_a, rtol=1e-5, atol=1e-5)
    for r, layout in enumerate(LAYOUTS):
        a = 0
        for i in layout:
            n = DOC_LENS[i]
            np.testing.assert_allclose(logits_p[r, a:a + n], logits_a[i, :n], rtol=1e-5,
                                       atol=1e-5, err_msg=f"{name} doc {i} row {r}")
            a += n
    # every document appears once in every packed row
    k = len(LAYOUTS)
    np.testing.assert_allclose(float(loss_p), k * float(loss_a), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree.leaves(g_a)):
        assert rel_err(a, k * b) < 1e-5, (name, jax.tree_util.keystr(path), rel_err(a, k * b))


def test_step_batch_keeps_segment_ids_and_the_loss_respects_them():
    """A text batch's segment_ids reach the model through the step: a packed batch's summed
    nll equals the sum over its documents run alone; positions stay out of the step."""
    from sessa_jax.models import DecoderLM, ModelConfig
    from sessa_jax.train.step import STEP_KEYS, batch_keys, loss_sums, step_batch

    assert batch_keys("text") == STEP_KEYS + ("segment_ids",)
    assert batch_keys("mqar") == STEP_KEYS
    rng = np.random.default_rng(2)
    n = 6
    docs = [rng.integers(1, 32, n + 1).astype(np.int32) for _ in range(2)]
    row = np.concatenate([docs[0][:-1], docs[1][:-1]])
    packed = {"inputs": row[None], "targets": np.concatenate([docs[0][1:], docs[1][1:]])[None],
              "loss_mask": np.ones((1, 2 * n), np.float32), "segment_ids": _ids([n, n])[None],
              "positions": np.tile(np.arange(n, dtype=np.int32), 2)[None]}
    batch = step_batch(packed)
    assert set(batch) == set(STEP_KEYS) | {"segment_ids"}
    assert set(step_batch({k: packed[k] for k in STEP_KEYS})) == set(STEP_KEYS)
    alone = {"inputs": np.stack([d[:-1] for d in docs]), "targets": np.stack([d[1:] for d in docs]),
             "loss_mask": np.ones((2, n), np.float32)}

    cfg = ModelConfig(family="transformer", vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                      mlp_ratio=1.0)
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)))
    model_def = lambda p: nnx.merge(graphdef, p)
    sums = jax.jit(lambda p, b: loss_sums(model_def, p, b))
    got, want = sums(params, batch), sums(params, alone)
    np.testing.assert_allclose(float(got["nll"]), float(want["nll"]), rtol=1e-5)
    assert float(got["scored"]) == float(want["scored"]) == 2 * n
