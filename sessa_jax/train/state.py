"""The train state pytree, the optimizer, and where each leaf lives on the mesh.

The NNX model is split once into a static graph definition and its parameters
(``nnx.split(model, nnx.Param, ...)``); the state carried from step to step is a plain pytree::

    TrainState(params   nested dict of arrays (nnx.to_pure_dict layout),
               opt_state optax AdamW state (mu/nu shaped like params),
               step      int32 ()  steps taken (skipped ones included: it is the data position),
               rng       uint32 (2,) PRNG key data, split per step for stochastic layers,
               skipped   int32 ()  non-finite steps skipped in total,
               streak    int32 ()  non-finite steps skipped in a row)

so it jits, donates, shards and checkpoints like any pytree. Only ``params`` depends on the
model; :class:`ModelDef` rebuilds the module inside a traced function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sessa_jax.models.layout import is_scanned
from sessa_jax.models.lm import DecoderLM
from sessa_jax.ops.attention import check_attention_impl
from sessa_jax.train.config import ConfigError, OptimizerConfig, TrainConfig
from sessa_jax.train.mesh import param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    """The pytree carried between steps (fields as in the module docstring)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array
    streak: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """What turns a params dict back into a DecoderLM: the graphdef and non-Param state."""

    graphdef: Any
    rest: Any  # pure dict of non-Param variables: empty for every model family today

    def __call__(self, params) -> DecoderLM:
        return nnx.merge(self.graphdef, params, self.rest)


def abstract_model(model_cfg, seed: int = 0):
    """(ModelDef, abstract params (ShapeDtypeStructs), logical PartitionSpecs), no allocation."""
    model = nnx.eval_shape(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):  # e.g. batch statistics or RNG streams: they would need a slot
        raise NotImplementedError(
            "the train state holds only nnx.Param variables; this model also has "
            f"{list(nnx.to_pure_dict(rest))}")
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    return ModelDef(graphdef, nnx.to_pure_dict(rest)), nnx.to_pure_dict(params), specs


# -- optimizer ----------------------------------------------------------------------------------


def lr_schedule(opt: OptimizerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup over ``warmup_steps`` (the first update already uses lr/warmup), then cosine
    from ``lr`` to ``lr * min_lr_ratio`` at ``total_steps``."""
    peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
    warm = opt.warmup_steps
    decay = max(total_steps - warm, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        up = peak * jnp.minimum(1.0, (t + 1.0) / max(warm, 1))
        frac = jnp.clip((t - warm) / decay, 0.0, 1.0)
        down = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(t < warm, up, down)

    return schedule


_NO_DECAY_NAMES = ("bias", "scale", "embedding", "A_log", "D", "gamma_bias")


def decay_mask(params) -> Any:
    """True where weight decay applies: matrices, except embeddings and SSM dynamics."""

    stacked = isinstance(params, dict) and "blocks" in params and is_scanned(params)

    def wants(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        # A scanned model's blocks carry a leading layers axis: not a matrix dimension.
        ndim = leaf.ndim - (stacked and str(getattr(path[0], "key", path[0])) == "blocks")
        return ndim >= 2 and name not in _NO_DECAY_NAMES  # LayerNorm/bias are 1-D

    return jax.tree_util.tree_map_with_path(wants, params)


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup-cosine schedule with a decay mask."""
    opt = cfg.optimizer
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    parts.append(optax.adamw(
        learning_rate=lr_schedule(opt, cfg.run.steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=decay_mask(params),
    ))
    return optax.chain(*parts)


# -- building and placing the state ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run's state: how to rebuild the model, the optimizer, and
    the abstract state with its shardings."""

    model_def: ModelDef
    tx: optax.GradientTransformation
    init_fn: Callable[[], TrainState]  # fresh state, to be jitted
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings, same structure
    mesh: Mesh


def make_setup(cfg: TrainConfig, mesh: Mesh) -> Setup:
    """Abstract state and shardings for ``cfg`` on ``mesh`` (nothing is allocated)."""
    if cfg.model.family in ("sessa", "transformer"):  # a kernel the run's devices cannot run
        try:
            check_attention_impl(cfg.model.attention_impl, field="model.attention_impl",
                                 head_dim=cfg.model.d_model // cfg.model.n_heads,
                                 dtype=jnp.dtype(cfg.model.dtype),
                                 platform=mesh.devices.flat[0].platform)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    rules = cfg.mesh.sharding_rules()
    model_def, abs_params, logical = abstract_model(cfg.model, cfg.run.seed)
    tx = make_optimizer(cfg, abs_params)

    def init_fn() -> TrainState:
        model = DecoderLM(cfg.model, rngs=nnx.Rngs(cfg.run.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params=params, opt_state=tx.init(params), step=zero,
                          rng=jax.random.PRNGKey(cfg.run.seed + 1), skipped=zero, streak=zero)

    abstract = jax.eval_shape(init_fn)
    p_shard = param_shardings(logical, abs_params, mesh, rules)
    rep = replicated(mesh)
    # mu/nu copy their parameter's sharding; counts and empty states are replicated.
    o_shard = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, p_shard,
                                    transform_non_params=lambda _: rep)
    shardings = TrainState(params=p_shard, opt_state=o_shard, step=rep, rng=rep, skipped=rep,
                           streak=rep)
    return Setup(model_def, tx, init_fn, abstract, shardings, mesh)


def init_state(setup: Setup) -> TrainState:
    """Fresh parameters (seeded by run.seed), created directly in their shards."""
    return jax.jit(setup.init_fn, out_shardings=setup.shardings)()


def abstract_with_shardings(setup: Setup) -> TrainState:
    """ShapeDtypeStructs carrying their target sharding (what a checkpoint restore needs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        setup.abstract, setup.shardings)
