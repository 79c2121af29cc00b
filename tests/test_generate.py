"""Generation: cached decoding equals the full forward, per-row independence under padding,
eos handling, sampling filters, and the cache-size check. Tiny models, few compilations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sessa_jax.generate import (
    Sampling, filter_logits, generate, pad_prompts, sample_logits, top_k_mask, top_p_mask,
    _generate_jit,
)
from sessa_jax.models import DecoderLM, ModelConfig

FAMILIES = ("sessa", "transformer", "mamba")
V, N = 48, 5  # vocab, new tokens per test
PROMPTS = [[1, 7, 9, 11, 13], [1, 20, 21]]


def _model(family):
    cfg = ModelConfig(
        family=family, vocab_size=V, d_model=32, n_layers=2, n_heads=4,
        n_kv_heads=2 if family != "mamba" else None, mlp_ratio=1.0, tie_embeddings=False,
        chunk_size=4, d_state=8,
    )
    return DecoderLM(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, _model(request.param)


def _reference_greedy(model, prompt, n):
    """Greedy decoding by re-running the full forward each step (no cache): argmax of the
    logits at the last real position, appended. One fixed-size buffer (so one compilation);
    the models are causal, so the unused tail after the last real token does not matter."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    L, out = len(prompt), []
    for _ in range(n):
        logits = fwd(state, jnp.asarray(buf))[0, L - 1]
        t = int(jnp.argmax(logits))
        out.append(t)
        buf[0, L] = t
        L += 1
    return out


def test_cached_greedy_matches_full_forward_and_rows_are_independent(family_model):
    family, model = family_model
    prompts, lengths = pad_prompts(PROMPTS)
    assert prompts.shape == (2, 5) and lengths.tolist() == [5, 3]
    out = generate(model, prompts, lengths, max_new_tokens=N, greedy=True)
    toks = np.asarray(out["tokens"])
    assert toks.shape == (2, N) and np.asarray(out["lengths"]).tolist() == [N, N]
    for b, p in enumerate(PROMPTS):
        # cached decoding == full forward, per row of a padded batch
        assert toks[b].tolist() == _reference_greedy(model, p, N), (family, b)
        # the same row alone (no padding at all) gives the same tokens
        alone = generate(model, np.asarray([p]), np.asarray([len(p)]), max_new_tokens=N,
                         greedy=True)
        assert np.asarray(alone["tokens"])[0].tolist() == toks[b].tolist(), (family, b)


def test_eos_stops_a_row_and_later_tokens_are_pad():
    model = _model("transformer")
    prompts, lengths = pad_prompts(PROMPTS, pad_id=0)
    base = np.asarray(generate(model, prompts, lengths, max_new_tokens=N, greedy=True)["tokens"])
    eos = int(base[0, 1])  # row 0's second new token becomes "eos"
    out = generate(model, prompts, lengths, max_new_tokens=N, greedy=True, eos_id=eos, pad_id=0)
    toks, n = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    first = [int(np.argmax(r == eos)) if (r == eos).any() else None for r in base]
    for b in range(2):
        if first[b] is None:
            assert n[b] == N and toks[b].tolist() == base[b].tolist()
        else:
            k = first[b]
            assert n[b] == k + 1  # eos counted
            assert toks[b, : k + 1].tolist() == base[b, : k + 1].tolist()
            assert (toks[b, k + 1 :] == 0).all()
    assert first[0] is not None and first[0] <= 1


def test_loop_exits_when_all_rows_done_and_compiles_once():
    model = _model("transformer")
    prompts, lengths = pad_prompts(PROMPTS)
    base = np.asarray(generate(model, prompts, lengths, max_new_tokens=N, greedy=True)["tokens"])
    size = _generate_jit._cache_size()
    # eos = each row's first token is impossible with one id unless they agree; use row 0's
    # first token with a 1-row batch: it finishes at step 0, everything after is pad.
    out = generate(model, prompts[:1], lengths[:1], max_new_tokens=N, greedy=True,
                   eos_id=int(base[0, 0]), pad_id=0)
    assert np.asarray(out["lengths"]).tolist() == [1]
    assert np.asarray(out["tokens"])[0, 1:].tolist() == [0] * (N - 1)
    # new token values, eos and pad ids of the same shapes reuse the compiled function
    generate(model, prompts[:1] + 1, lengths[:1], max_new_tokens=N, greedy=True,
             eos_id=5, pad_id=3)
    assert _generate_jit._cache_size() == size + 1


def test_top_k_1_equals_greedy():
    model = _model("sessa")
    prompts, lengths = pad_prompts(PROMPTS)
    greedy = generate(model, prompts, lengths, max_new_tokens=N, greedy=True)["tokens"]
    topk1 = generate(model, prompts, lengths, max_new_tokens=N, rng=jax.random.key(7),
                     temperature=1.3, top_k=1)["tokens"]
    np.testing.assert_array_equal(np.asarray(topk1), np.asarray(greedy))


def test_cache_size_check_raises():
    model = _model("mamba")
    prompts, lengths = pad_prompts(PROMPTS)
    with pytest.raises(ValueError, match="cache too small"):
        generate(model, prompts, lengths, max_new_tokens=N, greedy=True, max_len=5 + N - 1)
    with pytest.raises(ValueError, match="lengths"):
        generate(model, prompts, np.asarray([5, 0]), max_new_tokens=N, greedy=True)
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompts, lengths, max_new_tokens=N, temperature=1.0)


# ------------------------------------------------------------------ pure sampling functions

LOGITS = jnp.log(jnp.asarray([0.05, 0.4, 0.1, 0.3, 0.15]))  # probs, ranked: 1, 3, 4, 2, 0


@pytest.mark.parametrize("p, kept", [
    (0.3, [1]),  # 0.4 >= 0.3 already
    (0.39, [1]),
    (0.41, [1, 3]),  # 0.4 < 0.41, 0.7 >= 0.41
    (0.69, [1, 3]),
    (0.71, [1, 3, 4]),
    (0.9, [1, 2, 3, 4]),  # 0.85 < 0.9 -> needs the 4th (0.95)
    (0.96, [0, 1, 2, 3, 4]),
    (1.0, [0, 1, 2, 3, 4]),
])
def test_top_p_keeps_smallest_set_with_mass_at_least_p(p, kept):
    mask = np.asarray(top_p_mask(LOGITS, p))
    assert np.flatnonzero(mask).tolist() == kept
    probs = np.exp(np.asarray(LOGITS))
    assert probs[mask].sum() >= p - 1e-6
    # minimal: dropping the least likely kept token falls below p
    if len(kept) > 1:
        assert probs[mask].sum() - probs[mask].min() < p


def test_top_p_batched_rows_are_independent():
    x = jnp.stack([LOGITS, LOGITS[::-1]])
    m = np.asarray(top_p_mask(x, 0.5))
    assert np.flatnonzero(m[0]).tolist() == [1, 3]
    assert np.flatnonzero(m[1]).tolist() == [1, 3]  # reversed probs: 0.4 at 3, 0.3 at 1


def test_top_k_mask_and_filter():
    m = np.asarray(top_k_mask(LOGITS, 2))
    assert np.flatnonzero(m).tolist() == [1, 3]
    assert np.asarray(top_k_mask(LOGITS, 0)).all() and np.asarray(top_k_mask(LOGITS, 9)).all()
    ties = jnp.asarray([1.0, 2.0, 2.0, 2.0])
    assert np.asarray(top_k_mask(ties, 2)).sum() == 2  # exactly k, even with ties
    f = np.asarray(filter_logits(LOGITS, temperature=2.0, top_k=3, top_p=0.5))
    # temperature 2: probs ~ sqrt(p); top-3 keeps 1, 3, 4 (renormalised .40, .35, .25);
    # then top-p 0.5 keeps 1, 3
    assert np.isneginf(f[[0, 2, 4]]).all() and np.isfinite(f[[1, 3]]).all()
    np.testing.assert_allclose(f[1], float(LOGITS[1]) / 2.0, rtol=1e-6)


def test_sample_logits_greedy_and_filtered_support():
    x = jnp.tile(LOGITS, (64, 1))
    g = sample_logits(None, x, Sampling(greedy=True))
    assert (np.asarray(g) == 1).all()
    s = np.asarray(sample_logits(jax.random.key(0), x, Sampling(top_p=0.5)))
    assert set(s.tolist()) <= {1, 3} and len(set(s.tolist())) == 2
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError):
        Sampling(temperature=-1.0)


def test_pad_prompts():
    p, l = pad_prompts([[1, 2, 3], [4]], pad_id=9, length=4)
    assert p.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]] and l.tolist() == [3, 1]
    with pytest.raises(ValueError):
        pad_prompts([[1], []])
    with pytest.raises(ValueError):
        pad_prompts([[1, 2, 3]], length=2)


def test_generate_script_random_tiny_model():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "generate.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, script, "--random", "--model",
         os.path.join(root, "configs", "models", "transformer-tiny.yaml"),
         "--prompt", "Hi", "--prompt", "abc", "--max-new-tokens", "4", "--greedy", "--ids"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=== prompt:") == 2 and out.stdout.count("ids: [") == 2
    bad = subprocess.run(
        [sys.executable, script, "--checkpoint", os.path.join(root, "no-such-run"),
         "--prompt", "Hi"], capture_output=True, text=True, timeout=120, env=env,
    )
    assert bad.returncode != 0 and "load" in bad.stderr
