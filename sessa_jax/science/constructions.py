"""Closed-form constructions whose memory tail the theory predicts (docs/sessa.md, "The memory tail").

Every construction reports the influence of the *first* input (position 0) on output t, so
the lag is l = t. All are scalar (D = 1) linear maps computed in float64 with numpy/scipy:

* ``sessa-uniform``: the Sessa feedback solve s = (I - gamma * alpha)^{-1} f with uniform
  routing alpha[t, j] = 1/t for j < t (row 0 zero) and constant gamma. alpha is built directly
  and the unit lower-triangular system is solved for f = e_0; value(l) = |s_l|. Exactly,
  s_l = gamma * prod_{k<l}(1 + gamma/k) / l ~ l^(gamma - 1): a power law, beta = 1 - gamma.
  (q_b = k_b = 0 in :func:`sessa_jax.ops.feedback.feedback_solve` gives the same alpha; the
  tests check that.)
* ``attention-uniform``: uniform causal attention *with* the diagonal, y_t = 1/(t+1) *
  sum_{j<=t} x_j. d y_t / d x_j = 1/(t+1) for every j <= t; with the source fixed at j = 0,
  value(l) = 1/(l+1): slope -> -1 (over lags 20..T/4 the fitted slope is within 0.01 of -1).
* ``ssm-decay``: a constant-decay diagonal SSM h_t = a h_{t-1} + x_t; value(l) = a^l:
  exponential (a straight line of log value vs lag).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

CONSTRUCTIONS = ("sessa-uniform", "attention-uniform", "ssm-decay")


def uniform_alpha(T: int) -> np.ndarray:
    """(T, T) strictly causal uniform routing: alpha[t, j] = 1/t for j < t, row 0 zero."""
    t = np.arange(T, dtype=np.float64)
    alpha = np.tril(np.ones((T, T)), k=-1)
    return alpha / np.maximum(t, 1.0)[:, None]


def sessa_uniform(T: int, gamma: float) -> np.ndarray:
    """|d s_l / d f_0| for l = 0..T-1 under uniform routing and constant gamma."""
    m = np.eye(T) - gamma * uniform_alpha(T)
    f = np.zeros(T)
    f[0] = 1.0
    s = solve_triangular(m, f, lower=True, unit_diagonal=True)
    return np.abs(s)


def attention_uniform(T: int) -> np.ndarray:
    """|d y_l / d x_0| = 1/(l+1) for uniform causal attention including the diagonal."""
    # Build the (T, T) mixing matrix and read its first column, so the definition is explicit.
    t = np.arange(T, dtype=np.float64)
    w = np.tril(np.ones((T, T))) / (t + 1.0)[:, None]
    return np.abs(w[:, 0])


def ssm_decay(T: int, a: float) -> np.ndarray:
    """|d h_l / d x_0| = a^l for h_t = a h_{t-1} + x_t (computed by running the recursion)."""
    h, out = 1.0, np.empty(T)
    for t in range(T):
        out[t] = abs(h)
        h *= a
    return out


def construction_curve(name: str, T: int = 2000, gamma: float = 0.5, decay: float = 0.95):
    """(lags, values) for construction ``name``; lags 1..T-1 (lag 0 dropped)."""
    if name == "sessa-uniform":
        v = sessa_uniform(T, gamma)
    elif name == "attention-uniform":
        v = attention_uniform(T)
    elif name == "ssm-decay":
        v = ssm_decay(T, decay)
    else:
        raise ValueError(f"construction {name!r}: expected one of {', '.join(CONSTRUCTIONS)}")
    lags = np.arange(T)
    return lags[1:], v[1:]
