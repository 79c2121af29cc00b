"""Document boundaries inside a packed row: the one home of what a segment id means.

A packed row (``sessa_jax.data.packing``) carries ``segment_ids`` int32 (B, T): tokens of one
document share an id and every document is one contiguous run of it (ids 1, 2, ... in order,
0 on the row's trailing padding). Every sequence op takes the same ids:

* attention (forward branch, Transformer): key j is visible to query t iff j <= t and
  seg[j] == seg[t] (:func:`visible`);
* the Sessa feedback solve: the same, strictly (j < t), so alpha is block diagonal and the
  first token of a document reads nothing (s_t = f_t);
* RoPE positions restart at 0 at each segment start (:func:`segment_positions`);
* the Mamba state and its causal conv restart at each segment start (:func:`segment_starts`,
  :func:`segment_positions`).

Attention compares ids for equality while the recurrences cut at changes of id; the two agree
because each id is one run (what packing produces). ``segment_ids=None`` everywhere means one
segment per row: every op then compiles exactly as without segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(rows, cols, seg_rows=None, seg_cols=None, *, strict: bool = False,
            keys_first: bool = False):
    """Whether key ``cols[j]`` is visible to query ``rows[i]``.

    rows (R,), cols (C,) int positions; seg_rows (B, R), seg_cols (B, C) their segment ids, or
    None. Returns bool (R, C) without segment ids, else (B, R, C): cols <= rows (cols < rows
    when ``strict``) and, with ids, the same segment. ``keys_first``: the transposed layout,
    (C, R) or (B, C, R), for backward passes that walk key blocks.
    """
    if keys_first:
        causal = rows[None, :] > cols[:, None] if strict else rows[None, :] >= cols[:, None]
        if seg_rows is None:
            return causal
        return causal[None] & (seg_cols[:, :, None] == seg_rows[:, None, :])
    causal = cols[None, :] < rows[:, None] if strict else cols[None, :] <= rows[:, None]
    if seg_rows is None:
        return causal
    return causal[None] & (seg_rows[:, :, None] == seg_cols[:, None, :])


def segment_starts(segment_ids):
    """(B, T) int -> (B, T) bool: True where a new segment begins inside the row (t > 0 and
    seg[t] != seg[t-1]). Token 0 is not marked: what precedes the row (an initial state) is
    the caller's to give."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (1, 0)))


def segment_positions(segment_ids):
    """(B, T) int -> (B, T) int32: each token's offset from the start of its segment (or of
    the row, for the row's first segment). Equals the ``positions`` packing emits on real
    tokens."""
    T = segment_ids.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    start = jnp.where(segment_starts(segment_ids), t, 0)
    return t - jax.lax.cummax(start, axis=1)
