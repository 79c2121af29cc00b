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
* ``sessa-flat``: a profile that does not decay with lag, from a stack of two Sessa layers
  (the spec's "multi-layer Sessa can realise profiles that do not decay with distance"),
  realised by actual :class:`~sessa_jax.models.sessa.SessaLayer` weights
  (:func:`flat_stack_layers`). Derivation below.

The non-decaying construction (``sessa-flat``)
----------------------------------------------

One layer. Set the forward branch's query projection to zero: every score is 0, so the forward
branch is the uniform causal mean A[t, k] = 1/(t+1), k <= t (diagonal included). Set the
feedback projection to zero: q_b = k_b = 0, so alpha is the uniform strictly causal routing
alpha[t, j] = 1/t. Set w_gamma = 0 and gamma_bias = atanh(gamma / gamma_max): a constant gain.
The mixer is then linear in its values, s = M^{-1} A v with M = I - gamma alpha, and the residual
block at a constant operating point is x -> x + K x (times a fixed D x D map, made a projection
below) with the time kernel K = M^{-1} A.

Its tail. Forward substitution with uniform routing gives, for a unit source at j = 0,
(M^{-1})[t, 0] = (gamma/t) prod_{k<t} (1 + gamma/k) = gamma Gamma(t+gamma) / (Gamma(1+gamma)
Gamma(t+1)) ~ t^(gamma-1) / Gamma(gamma), and more generally (M^{-1})[t, k] ~ c t^(gamma-1)
k^(-gamma): a kernel homogeneous of degree -1 (scale-free). The running mean A keeps the
exponent, so one layer decays as l^-(1-gamma): beta = 1 - gamma > 0 for every gamma < 1
(gamma_max < 1), which is the single-layer power law of ``sessa-uniform``.

Two layers. The stack is (I + K)(I + K) = I + 2K + K K. The cross term is the sum over every
intermediate position k of a path through both feedbacks:
(K K)[t, 0] = sum_k K[t, k] K[k, 0] ~ c^2 t^(gamma-1) sum_{k<t} k^(-gamma) k^(gamma-1)
= c^2 t^(gamma-1) ln t. So value(l) ~ C l^(gamma-1) (a + ln l): the paths multiply by ln l, whose
log-log slope 1/(ln l + a) re-amplifies what each layer loses, -(1-gamma). Over lags 10..1000
(ln l from 2.3 to 6.9) the two cancel at gamma = 7/8: the fitted power-law slope is -0.001
(each layer alone: -0.125). With L layers the cross terms give (ln l)^(L-1), so any window can
be made flat, and at gamma -> 1 one layer already is: (M^{-1})[t, 0] = 1 exactly at gamma = 1.
The limit of the construction, stated plainly: with every gain below 1 the asymptotic exponent
of a stack is 1 - max_layer gamma >= 1 - gamma_max (0.001 at the default gamma_max), so "flat"
means flat over a stated window of lags, which here is 10..1000 and ends where ln l stops
growing fast enough (at T = 2000: slope -0.001 over 10..1000, -0.017 over 100..1999; one
layer -0.124, three tied layers +0.099, i.e. growing).

Convention. Like the other constructions, value(l) is the influence of position 0 on position
l. The model measurement (:mod:`sessa_jax.science.influence`) instead averages over all sources
j = t - l of a finite window T, which for these scale-free kernels mixes in how each source is
diluted (K[t, j] scales like 1/j), so its curves are not shift-invariant; ``sessa_flat`` reports
the position-0 profile, and the test checks the real layers against every (t, j) entry.

Realisation with real layers (:func:`flat_stack_layers`): D = 4, one head. At the constant input
x_t = x0 = (1, -1, 1, -1) every layer has LayerNorm output x0 (up to eps), a = 0 (W_in's first
half is u u^T, bias 0, with u = (1, 1, -1, -1)/2, orthogonal to 1 and to x0, so LayerNorm's
Jacobian passes u unchanged up to 1/sqrt(1+eps)), gate g = 1 (W_in's second half 0, bias 1),
v = GELU(0) u u^T = 0, so s = 0 and y = x0: the next layer sees the same point. The chain
u u^T (W_a) * GELU'(0) = 1/2 * u u^T (W_v) * 2 sqrt(1+eps) u u^T (W_out) makes the block's
fixed map exactly the projection P = u u^T; every score derivative is 0 (q = 0, q_b = k_b = 0)
and gamma is constant, so the stack's Jacobian at x0 is I + (2K + K K) (x) P: block (t, j), t > j,
has Frobenius norm |2K + K K|[t, j], which is what ``sessa_flat`` computes in float64.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

CONSTRUCTIONS = ("sessa-uniform", "attention-uniform", "ssm-decay", "sessa-flat")
FLAT_GAMMA = 0.875  # the tied gain that makes two layers flat over lags 10..1000 (see above)


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


def uniform_mean(T: int) -> np.ndarray:
    """(T, T) uniform causal mean with the diagonal: A[t, k] = 1/(t+1) for k <= t."""
    t = np.arange(T, dtype=np.float64)
    return np.tril(np.ones((T, T))) / (t + 1.0)[:, None]


def sessa_layer_kernel(T: int, gamma: float) -> np.ndarray:
    """(T, T) time kernel K = (I - gamma alpha)^{-1} A of one Sessa layer with a zero query
    (forward branch = uniform causal mean A), zero feedback projection (uniform alpha) and
    constant gain gamma."""
    m = np.eye(T) - gamma * uniform_alpha(T)
    return solve_triangular(m, uniform_mean(T), lower=True, unit_diagonal=True)


def sessa_stack_jacobian(T: int, gamma: float = FLAT_GAMMA, layers: int = 2) -> np.ndarray:
    """(T, T) time part of the Jacobian of ``layers`` residual blocks x -> x + K x:
    (I + K)^layers. Its off-diagonal entries are the blocks' Frobenius norms in
    :func:`flat_stack_layers` (whose fixed D x D map is a rank-one projection)."""
    k = sessa_layer_kernel(T, gamma)
    j = np.eye(T)
    for _ in range(layers):
        j = j + k @ j
    return j


def sessa_flat(T: int, gamma: float = FLAT_GAMMA, layers: int = 2) -> np.ndarray:
    """|d y_l / d x_0| (the projected direction) for l = 0..T-1 through the stack."""
    return np.abs(sessa_stack_jacobian(T, gamma, layers)[:, 0])


FLAT_X0 = (1.0, -1.0, 1.0, -1.0)  # the operating point: every position's input
FLAT_U = (0.5, 0.5, -0.5, -0.5)  # the carried direction: orthogonal to 1 and to FLAT_X0


def flat_stack_layers(gamma: float = FLAT_GAMMA, layers: int = 2, gamma_max: float = 0.999,
                      dtype: str = "float32"):
    """Real SessaLayers (D = 4, one head, dense solve) whose stack computes ``sessa-flat``
    at the input x_t = FLAT_X0 for every t (see the module docstring for why each weight)."""
    import jax.numpy as jnp
    from flax import nnx
    from sessa_jax.models.config import SessaConfig
    from sessa_jax.models.sessa import SessaLayer

    if not 0 < gamma < gamma_max:
        raise ValueError(f"gamma={gamma!r}: expected a number in (0, gamma_max={gamma_max})")
    D = 4
    cfg = SessaConfig(d_model=D, n_heads=1, gamma_max=gamma_max, feedback_impl="dense",
                      dtype=dtype, param_dtype=dtype)
    u = np.asarray(FLAT_U)
    proj = np.outer(u, u)
    zeros = np.zeros((D, D))
    out = []
    for i in range(layers):
        layer = SessaLayer(cfg, rngs=nnx.Rngs(i))
        sets = {
            (layer.W_in, "kernel"): np.concatenate([proj, zeros], axis=1),  # a = u u^T, g: 0
            (layer.W_in, "bias"): np.concatenate([np.zeros(D), np.ones(D)]),  # g = 1
            (layer.mixer.q_proj, "kernel"): zeros, (layer.mixer.q_proj, "bias"): np.zeros(D),
            (layer.mixer.v_proj, "kernel"): proj, (layer.mixer.v_proj, "bias"): np.zeros(D),
            (layer.mixer.proj_fb, "kernel"): np.zeros((D, 2 * D)),
            (layer.mixer.proj_fb, "bias"): np.zeros(2 * D),
            (layer.mixer.gamma_ctx, "kernel"): np.zeros((D, 1)),
            # GELU'(0) = 1/2 and LayerNorm's 1/sqrt(1 + eps) on u, undone here
            (layer.W_out, "kernel"): 2.0 * np.sqrt(1.0 + cfg.ln_eps) * proj,
            (layer.W_out, "bias"): np.zeros(D),
        }
        for (mod, name), value in sets.items():
            getattr(mod, name)[...] = jnp.asarray(value, dtype)
        layer.mixer.gamma_bias[...] = jnp.asarray(np.arctanh(gamma / gamma_max), dtype)
        out.append(layer)
    return out


def construction_curve(name: str, T: int = 2000, gamma: float = 0.5, decay: float = 0.95,
                       flat_gamma: float = FLAT_GAMMA, layers: int = 2):
    """(lags, values) for construction ``name``; lags 1..T-1 (lag 0 dropped). ``gamma``:
    sessa-uniform's gain; ``flat_gamma``/``layers``: sessa-flat's tied gain and depth."""
    if name == "sessa-uniform":
        v = sessa_uniform(T, gamma)
    elif name == "sessa-flat":
        v = sessa_flat(T, flat_gamma, layers)
    elif name == "attention-uniform":
        v = attention_uniform(T)
    elif name == "ssm-decay":
        v = ssm_decay(T, decay)
    else:
        raise ValueError(f"construction {name!r}: expected one of {', '.join(CONSTRUCTIONS)}")
    lags = np.arange(T)
    return lags[1:], v[1:]
