"""Per-layer feedback statistics of a Sessa model, for finding what blows up when it diverges.

Opt-in (``run.stability_stats: true``): on logging steps the loop runs one extra forward pass
(no backward) of the current parameters on the step's batch and writes, for every Sessa layer i,
``stability/layer<i>/<name>`` into metrics.jsonl beside the loss. Names (float32 scalars):

* ``gamma_abs_max``, ``gamma_mean``: max |gamma_t| and mean gamma_t over the batch; the solve
  is a contraction only while |gamma| < 1 (gamma_max caps it).
* ``gamma_gt_0.99``: fraction of tokens with |gamma_t| > 0.99 (near the edge, memory is long and
  the system (I - diag(gamma) alpha) is close to singular in the directions alpha averages).
* ``score_max``, ``score_std``: max and std of the feedback scores q_b[t].k_b[j]/sqrt(D) over the
  strictly causal pairs j < t (of one document, for packed rows) of the batch's first row
  (T x T, so one row keeps it cheap);
  large scores make alpha one-hot and its softmax gradient spiky.
* ``s_growth``: RMS of the mixer output s over the last quarter of positions / over the first
  quarter, so growth of s along t (the feedback accumulating) shows as a ratio >> 1.
* ``s_over_f_first``, ``s_over_f_last``: RMS(s)/RMS(f) over the first and the last quarter of
  positions (f = the forward branch, the solve's right-hand side): what the feedback adds.

All positions count, padding included (the model computes them too). The layer internals are
recomputed with the layer's own methods (``_pre``, ``attend``, ``_feedback_inputs``), so the
statistics are of exactly the computation the train step runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from sessa_jax.models.partitioning import activation_sharding
from sessa_jax.ops.feedback import feedback_solve
from sessa_jax.ops.segments import visible

STAT_NAMES = ("gamma_abs_max", "gamma_mean", "gamma_gt_0.99", "score_max", "score_std",
              "s_growth", "s_over_f_first", "s_over_f_last")


def _rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def layer_stats(layer, x, segment_ids=None) -> tuple[jax.Array, dict]:
    """One SessaLayer on x (B, T, D) (segment_ids (B, T) or None, as the layer takes them)
    -> (its output (B, T, D), {name: float32 scalar})."""
    cfg, mixer = layer.cfg, layer.mixer
    a, g = layer._pre(x)
    f = mixer.attend(a, segment_ids=segment_ids)
    q_b, k_b, gamma = mixer._feedback_inputs(a)
    s = feedback_solve(q_b, k_b, gamma, f, impl=cfg.feedback_impl, chunk_size=cfg.chunk_size,
                       segment_ids=segment_ids)
    y = x + layer.W_out(s * g)

    T, D = x.shape[1], x.shape[2]
    q0, k0 = q_b[0].astype(jnp.float32), k_b[0].astype(jnp.float32)
    scores = (q0 @ k0.T) / jnp.sqrt(jnp.float32(D))  # (T, T)
    t = jnp.arange(T)
    seg0 = None if segment_ids is None else segment_ids[:1]
    strict = visible(t, t, seg0, seg0, strict=True).reshape(T, T)  # pairs the solve reads
    n = jnp.maximum(jnp.sum(strict), 1)
    mean = jnp.sum(jnp.where(strict, scores, 0.0)) / n
    var = jnp.sum(jnp.where(strict, jnp.square(scores - mean), 0.0)) / n
    q = max(T // 4, 1)
    first, last = slice(0, q), slice(T - q, T)
    eps = jnp.float32(1e-30)  # a zero f (or s) gives a huge ratio rather than a NaN
    stats = {
        "gamma_abs_max": jnp.max(jnp.abs(gamma)),
        "gamma_mean": jnp.mean(gamma),
        "gamma_gt_0.99": jnp.mean((jnp.abs(gamma) > 0.99).astype(jnp.float32)),
        "score_max": jnp.max(jnp.where(strict, scores, -jnp.inf)) if T > 1 else jnp.float32(0),
        "score_std": jnp.sqrt(var),
        "s_growth": _rms(s[:, last]) / (_rms(s[:, first]) + eps),
        "s_over_f_first": _rms(s[:, first]) / (_rms(f[:, first]) + eps),
        "s_over_f_last": _rms(s[:, last]) / (_rms(f[:, last]) + eps),
    }
    return y, {k: v.astype(jnp.float32) for k, v in stats.items()}


def model_stats(model, tokens, segment_ids=None) -> dict:
    """A Sessa DecoderLM on tokens (B, T) (segment_ids (B, T) or None)
    -> {"stability/layer<i>/<name>": scalar}."""
    from sessa_jax.models.sessa import SessaLayer

    def block_stats(block, x):
        if not isinstance(block.mixer, SessaLayer):
            raise ValueError(f"a block is a {type(block.mixer).__name__}: the stability "
                             "statistics are of Sessa layers (model.family='sessa')")
        x, st = layer_stats(block.mixer, x, segment_ids)
        return (block.mlp(x) if block.mlp is not None else x), st

    x = model.embed_tokens(tokens)
    if model.cfg.scan_layers:  # one scanned body, stats stacked (n_layers,) per name
        _, st = model.scan_blocks(lambda b, h, _: block_stats(b, h), x)
        per_layer = [{k: v[i] for k, v in st.items()} for i in range(model.cfg.n_layers)]
    else:
        per_layer = []
        for block in model.blocks:
            x, st = block_stats(block, x)
            per_layer.append(st)
    return {f"stability/layer{i}/{k}": v for i, st in enumerate(per_layer) for k, v in st.items()}


def make_stats_step(cfg, setup) -> Optional[Callable]:
    """``stats(params, batch) -> {name: replicated scalar}``, jitted; None when the run does
    not ask for it (``run.stability_stats``) or the model is not Sessa."""
    if not cfg.run.stability_stats or cfg.model.family != "sessa":
        return None
    from sessa_jax.train.mesh import batch_spec, replicated

    model_def, mesh = setup.model_def, setup.mesh
    rules = cfg.mesh.sharding_rules()

    def stats(params, batch):
        with activation_sharding(mesh, rules):
            return model_stats(model_def(params), batch["inputs"], batch.get("segment_ids"))

    batch_sh = NamedSharding(mesh, batch_spec(rules))  # every (G, T) key, as the train step
    return jax.jit(stats, in_shardings=(setup.shardings.params, batch_sh),
                   out_shardings=replicated(mesh))
