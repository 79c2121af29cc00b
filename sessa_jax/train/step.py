"""The jitted train and eval steps.

Loss: next-token cross-entropy in float32, averaged over scored positions (``loss_mask`` > 0) of
the whole global batch. With ``grad_accum_steps`` = k the batch (G, T) is viewed as
(G/k, k, T) -> k microbatches of G/k rows (row i*k + j goes to microbatch j, so every device
keeps its own rows) and a ``lax.scan`` sums their gradients of sum(nll)/total_scored: exactly
the single-batch gradient, up to float summation order.

Non-finite guard: if the loss, the gradient norm or the update norm is not finite, the step
keeps params and optimizer state, counts the skip (``skipped``, ``streak``) and still advances
``step`` (the data position), so a bad batch is passed over rather than retried forever.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sessa_jax.data import num_scored_examples, sequence_correct
from sessa_jax.models.partitioning import activation_sharding
from sessa_jax.train.config import TrainConfig
from sessa_jax.train.mesh import batch_spec, replicated
from sessa_jax.train.state import Setup, TrainState, lr_schedule


# The batch keys the steps consume. Text batches (rows packed from documents, data/packing.py)
# also carry SEGMENT_KEYS: ``segment_ids`` int32 (G, T) go to the model, which keeps every
# document to itself. Their ``positions`` are left out: the model derives the same positions
# from the ids (ops/segments.py), so there is one source for them.
STEP_KEYS = ("inputs", "targets", "loss_mask")
SEGMENT_KEYS = ("segment_ids",)


def batch_keys(task: str) -> tuple[str, ...]:
    """The keys of the step batches of data task ``task`` (text rows are packed)."""
    return STEP_KEYS + (SEGMENT_KEYS if task == "text" else ())


def step_batch(batch: dict) -> dict:
    """The keys of a data batch that the jitted steps take: STEP_KEYS, and SEGMENT_KEYS when
    the batch has them."""
    return {k: batch[k] for k in STEP_KEYS + SEGMENT_KEYS if k in batch}


def abstract_batch(cfg: TrainConfig, sharding) -> dict:
    """ShapeDtypeStructs of one global step batch (G, T) of ``cfg``'s task, laid out by
    ``sharding`` (ahead-of-time lowering)."""
    shape = (cfg.run.global_batch_size, cfg.data.seq_len)
    dtype = lambda k: jnp.float32 if k == "loss_mask" else jnp.int32
    return {k: jax.ShapeDtypeStruct(shape, dtype(k), sharding=sharding)
            for k in batch_keys(cfg.data.task)}


def loss_sums(model_def, params, batch: dict, *, predict=True) -> dict:
    """Sums over the batch (B, T): nll, scored positions, correct argmax at scored positions.

    The cross-entropy goes through ``DecoderLM.token_nll`` (chunked over the sequence by
    ``model.loss_chunk_size``). ``predict`` (a bool or a traced bool) gates the argmax:
    "correct" is 0 where it is false. ``segment_ids``, when the batch has them, go to the model.
    """
    model = model_def(params)
    targets, mask = batch["targets"], batch["loss_mask"] > 0
    h = model.hidden(batch["inputs"], batch.get("segment_ids"))
    nll, pred = model.token_nll(h, targets, predict=predict)
    correct = (0.0 if pred is None
               else jnp.sum((pred == targets) & mask, dtype=jnp.float32))
    return {
        "nll": jnp.sum(jnp.where(mask, nll, 0.0)),
        "scored": jnp.sum(mask, dtype=jnp.float32),
        "correct": jnp.asarray(correct, jnp.float32),
    }


def logged_step(cfg: TrainConfig, k):
    """Whether the training loop logs the metrics of step ``k`` (1-based: the step count
    after the update). Works on Python ints and traced ints, so the train step computes train
    accuracy (an argmax over V at every position) only on the steps that get logged: every
    ``log_every``, the last, eval steps, and checkpoint steps that rank by an eval metric."""
    run, ck = cfg.run, cfg.checkpoint
    last = k == run.steps
    hit = lambda every: (k % every == 0) if every else False
    is_save = last | hit(ck.every_steps)
    ranked = is_save if ck.keep_best_metric is not None else False
    return hit(run.log_every) | last | hit(run.eval_every) | ranked


def _where_tree(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(cfg: TrainConfig, setup: Setup) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with explicit shardings and the state
    donated. batch: {"inputs" int32 (G, T), "targets" int32 (G, T), "loss_mask" f32 (G, T)}
    and, for packed text, "segment_ids" int32 (G, T) (see :func:`step_batch`).
    metrics (replicated scalars): loss, accuracy, grad_norm, learning_rate, scored, skipped.
    accuracy is NaN on steps that :func:`logged_step` says are not logged (not computed).
    """
    accum = cfg.optimizer.grad_accum_steps
    schedule = lr_schedule(cfg.optimizer, cfg.run.steps)
    model_def, tx, mesh = setup.model_def, setup.tx, setup.mesh
    rules = cfg.mesh.sharding_rules()
    row_axes = batch_spec(rules)[0]
    micro_sharding = NamedSharding(mesh, P(None, row_axes, None))

    def grads_of(params, mb, denom, predict):
        def f(p):
            sums = loss_sums(model_def, p, mb, predict=predict)
            return sums["nll"] / denom, sums

        (_, sums), g = jax.value_and_grad(f, has_aux=True)(params)
        return g, sums

    def step(state: TrainState, batch: dict):
        with activation_sharding(mesh, rules):
            return _step(state, batch)

    def _step(state: TrainState, batch: dict):
        denom = jnp.maximum(jnp.sum(batch["loss_mask"] > 0, dtype=jnp.float32), 1.0)
        predict = logged_step(cfg, state.step + 1)  # train accuracy only when it is logged
        if accum == 1:
            grads, sums = grads_of(state.params, batch, denom, predict)
        else:
            def split(x):  # (G, T) -> (k, G/k, T), microbatch j = rows j, k + j, 2k + j, ...
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_sharding)

            micro = jax.tree.map(split, batch)
            zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zero_s = {k: jnp.zeros((), jnp.float32) for k in ("nll", "scored", "correct")}

            def body(carry, mb):
                g_acc, s_acc = carry
                g, s = grads_of(state.params, mb, denom, predict)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, jax.tree.map(jnp.add, s_acc, s)), None

            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), micro)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        loss = sums["nll"] / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        applied = state.step - state.skipped  # optimizer updates so far: the schedule's clock
        bad = (~ok).astype(jnp.int32)
        new_state = TrainState(
            params=_where_tree(ok, new_params, state.params),
            opt_state=_where_tree(ok, new_opt, state.opt_state),
            step=state.step + 1,
            rng=jax.random.split(state.rng)[0],
            skipped=state.skipped + bad,
            streak=jnp.where(ok, 0, state.streak + 1),
        )
        metrics = {
            "loss": loss,
            "accuracy": jnp.where(predict, sums["correct"] / denom, jnp.nan),
            "grad_norm": grad_norm,
            "learning_rate": schedule(applied),
            "scored": sums["scored"],
            "skipped": bad,
            "streak": new_state.streak,
        }
        return new_state, metrics

    # One sharding for every (G, T) batch key (a pytree prefix): batches with and without
    # segment ids take the same step function.
    batch_sh = NamedSharding(mesh, batch_spec(rules))
    return jax.jit(step, in_shardings=(setup.shardings, batch_sh),
                   out_shardings=(setup.shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(cfg: TrainConfig, setup: Setup, byte_lengths: Optional[np.ndarray] = None
                   ) -> Callable:
    """``eval_step(params, batch) -> sums`` (replicated float32 scalars): nll, scored, correct,
    seq_correct (examples with every scored position right), examples (rows with a scored
    position) and, when ``byte_lengths`` (V,) is given (text), bytes of the scored targets."""
    model_def, mesh = setup.model_def, setup.mesh
    rules = cfg.mesh.sharding_rules()
    table = None if byte_lengths is None else jnp.asarray(byte_lengths, jnp.float32)

    def ev(params, batch):
        targets, mask = batch["targets"], batch["loss_mask"]
        with activation_sharding(mesh, rules):
            model = model_def(params)
            h = model.hidden(batch["inputs"], batch.get("segment_ids"))
            nll, pred = model.token_nll(h, targets, predict=True)
        scored = mask > 0
        out = {
            "nll": jnp.sum(jnp.where(scored, nll, 0.0)),
            "scored": jnp.sum(scored, dtype=jnp.float32),
            "correct": jnp.sum((pred == targets) & scored, dtype=jnp.float32),
            "seq_correct": jnp.sum(sequence_correct(pred, targets, mask), dtype=jnp.float32),
            "examples": num_scored_examples(mask).astype(jnp.float32),
        }
        if table is not None:
            out["bytes"] = jnp.sum(jnp.where(scored, table[targets], 0.0))
        return out

    batch_sh = NamedSharding(mesh, batch_spec(rules))  # every (G, T) key, as in the train step
    return jax.jit(ev, in_shardings=(setup.shardings.params, batch_sh),
                   out_shardings=replicated(mesh))


def summarize_eval(sums: dict) -> dict:
    """Summed eval counters -> metrics: loss, accuracy, seq_accuracy (+ perplexity and
    bits_per_byte when byte counts are present)."""
    scored = max(sums["scored"], 1.0)
    loss = sums["nll"] / scored
    out = {
        "loss": loss,
        "accuracy": sums["correct"] / scored,
        "seq_accuracy": sums["seq_correct"] / max(sums["examples"], 1.0),
        "examples": int(sums["examples"]),
    }
    if "bytes" in sums:
        out["perplexity"] = math.exp(min(loss, 700.0))
        out["bits_per_byte"] = sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)
    return out


def token_byte_lengths(task) -> Optional[np.ndarray]:
    """Bytes each token id stands for, (V,) — for bits per byte on text; None for other tasks.

    From the tokenizer (``token_bytes``): 1 per byte id for bytes, the UTF-8 length of each
    piece for Hugging Face / SentencePiece; specials (<eos> too) count 0, so bits per byte =
    nll_nats_per_token * tokens / text bytes / ln 2.
    """
    if task.name != "text":
        return None
    return np.asarray(task.token_bytes(), np.float32)
