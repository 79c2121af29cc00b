"""Autoregressive generation for every model family, as one jit-compiled function.

    prompts, lengths = pad_prompts([[1, 72, 105], [1, 87]], pad_id=0)   # right-padded
    out = generate(model, prompts, lengths, max_new_tokens=32, rng=jax.random.key(0),
                   temperature=0.8, top_p=0.95, eos_id=2)
    out["tokens"]   # (B, 32) new tokens; after a row's eos, pad_id
    out["lengths"]  # (B,) tokens generated per row, its eos included

Prompts are RIGHT-padded: row b's real tokens are ``prompts[b, :lengths[b]]``; what follows is
ignored (left-padded input is not supported: causal blocks would read the pads as context).
One jitted function runs the prefill of the whole batch, samples each row's first new token
from the logits at its own last real position (``lengths - 1``), then a ``lax.while_loop`` of
single-token decode steps over fixed-size caches, each row at its own position (the caches
keep a per-row ``pos``; a ``scan_layers`` model keeps one cache stacked over its layers and
scans them each step). A row that emits ``eos_id`` is done: it emits ``pad_id`` from then on,
and the loop exits early once every row is done. The function is compiled once per (model
structure, batch shape, max_new_tokens, cache size, sampling settings); token values, lengths,
rng, eos_id and pad_id are traced, so new prompts of the same shape reuse it.

Sampling order per step: temperature, then top-k, then top-p (nucleus), then a categorical
draw; ``greedy=True`` (or temperature 0) takes the argmax instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ---------------------------------------------------------------- logits filtering (pure)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Boolean mask (..., V) of the ``k`` largest logits per row (exactly k; ties broken by
    index, lowest first, as ``lax.top_k`` does). ``k <= 0`` or ``k >= V`` keeps everything."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return jnp.ones(logits.shape, bool)
    _, idx = jax.lax.top_k(logits, k)  # (..., k)
    idx = idx.reshape(-1, k)
    rows = jnp.arange(idx.shape[0])[:, None]
    keep = jnp.zeros((idx.shape[0], V), bool).at[rows, idx].set(True)
    return keep.reshape(logits.shape)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Boolean mask (..., V) of the nucleus: per row, the smallest set of most likely tokens
    whose probability mass is >= ``p`` (the most likely token is always kept). ``p >= 1``
    keeps everything. Ties in probability are ordered by index, lowest first."""
    if p >= 1.0:
        return jnp.ones(logits.shape, bool)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V).astype(jnp.float32)
    order = jnp.argsort(-flat, axis=-1, stable=True)  # descending, stable
    probs = jax.nn.softmax(jnp.take_along_axis(flat, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    keep_sorted = before < p  # a token joins while the set so far holds less than p
    rows = jnp.arange(flat.shape[0])[:, None]
    keep = jnp.zeros(flat.shape, bool).at[rows, order].set(keep_sorted)
    return keep.reshape(logits.shape)


def filter_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """(..., V) logits -> float32 logits / temperature with the tokens outside top-k and then
    outside the top-p nucleus set to -inf. ``temperature`` must be > 0."""
    x = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        x = jnp.where(top_k_mask(x, top_k), x, -jnp.inf)
    if top_p < 1.0:
        x = jnp.where(top_p_mask(x, top_p), x, -jnp.inf)
    return x


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings (hashable: part of the compilation key)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: expected >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: expected a number in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def sample_logits(rng, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """(B, V) logits -> (B,) int32 tokens: argmax when greedy, else a categorical draw from
    the filtered logits."""
    if sampling.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(
        logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
    )
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------- prompts


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (prompts (B, T) int32 right-padded with ``pad_id``, lengths (B,) int32).

    T = the longest prompt, or ``length`` if given (which must fit them all). Every prompt needs
    at least one token (e.g. bos): the first new token is predicted from the last real one.
    """
    lens = [len(p) for p in prompts]
    if not lens:
        raise ValueError("pad_prompts: no prompts")
    if min(lens) == 0:
        raise ValueError("pad_prompts: every prompt needs at least one token (e.g. bos)")
    T = max(lens) if length is None else length
    if T < max(lens):
        raise ValueError(f"pad_prompts: length={T} is shorter than the longest prompt {max(lens)}")
    out = np.full((len(prompts), T), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = np.asarray(p, np.int32)
    return out, np.asarray(lens, np.int32)


# ---------------------------------------------------------------- the generation loop


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "sampling", "use_eos")
)
def _generate_jit(graphdef, state, prompts, lengths, rng, eos_id, pad_id, *,
                  max_new_tokens: int, max_len: int, sampling: Sampling, use_eos: bool):
    """The whole generation: prefill, first token, then a while_loop of decode steps."""
    model = nnx.merge(graphdef, state)
    B = prompts.shape[0]
    N = max_new_tokens

    cache = model.init_cache(B, max_len)
    # Logits at each row's last real position only: the LM head runs on B positions, not B*T.
    last, cache = model.prefill(prompts, cache, lengths, last_only=True)  # (B, V)

    def emit(i, logits, out, done, n):
        """Sample token i from logits (B, V); rows already done emit pad instead."""
        tok = sample_logits(jax.random.fold_in(rng, i), logits, sampling)
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        n = n + (~done).astype(jnp.int32)  # counts the eos token itself
        if use_eos:
            done = done | (tok == eos_id)
        return tok, out, done, n

    out = jnp.full((B, N), pad_id, jnp.int32)
    tok, out, done, n = emit(0, last, out, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < N) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done, n = carry
        # Done rows still step (batch-wide decode) on pad input; their outputs are discarded,
        # and they never write past max_len: at most N - 1 decode steps after a prompt <= T.
        logits, cache = model.decode_step(tok, cache, check=False)  # lengths checked up front
        tok, out, done, n = emit(i, logits, out, done, n)
        return i + 1, tok, cache, out, done, n

    carry = (jnp.int32(1), tok, cache, out, done, n)
    _, _, _, out, _, n = jax.lax.while_loop(cond, body, carry)
    return {"tokens": out, "lengths": n}


def generate(
    model: nnx.Module,
    prompts,
    lengths,
    *,
    max_new_tokens: int,
    rng=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    max_len: Optional[int] = None,
) -> dict[str, jax.Array]:
    """Generate ``max_new_tokens`` tokens after each right-padded prompt.

    Args:
      model: a DecoderLM (any family), or any module with ``init_cache(B, max_len)``,
        ``prefill(tokens, cache, lengths, last_only=True)`` (-> (B, V) logits at
        ``lengths - 1``) and ``decode_step(token, cache)``.
      prompts: (B, T) int right-padded prompts (see :func:`pad_prompts`).
      lengths: (B,) int real prompt lengths, 1 <= lengths <= T.
      max_new_tokens: tokens to generate per row (static).
      rng: a PRNG key (``jax.random.key``/``PRNGKey``) or an int seed; not needed when greedy.
      temperature, top_k, top_p, greedy: sampling settings (static); temperature 0 = greedy,
        top_k 0 and top_p 1 = off.
      eos_id: a row that emits it stops (None: never stop early).
      pad_id: emitted by finished rows.
      max_len: cache size; default (and what is needed) T + max_new_tokens.

    Returns:
      {"tokens": (B, max_new_tokens) int32, "lengths": (B,) int32 number of tokens generated
      per row, up to and including its eos}.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    sampling = Sampling(float(temperature), int(top_k), float(top_p), bool(greedy))
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts: expected a (B, T) array, got shape {prompts.shape}")
    B, T = prompts.shape
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
        if lo < 1 or hi > T:
            raise ValueError(f"lengths must lie in [1, T={T}] (right-padded prompts), got "
                             f"[{lo}, {hi}]")
    need = T + max_new_tokens
    max_len = need if max_len is None else int(max_len)
    if max_len < need:
        raise ValueError(
            f"cache too small: prompt length T={T} + max_new_tokens={max_new_tokens} = {need} "
            f"exceeds max_len={max_len}"
        )
    if sampling.is_greedy:
        rng = jax.random.key(0) if rng is None else rng  # unused by argmax
    elif rng is None:
        raise ValueError("sampling (greedy=False, temperature > 0) needs rng=jax.random.key(...)")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef, state, prompts, lengths, rng,
        jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
        max_new_tokens=max_new_tokens, max_len=max_len, sampling=sampling,
        use_eos=eos_id is not None,
    )
