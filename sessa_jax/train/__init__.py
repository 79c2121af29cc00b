"""Training for sessa_jax: configs, mesh, train state, jitted steps, checkpoints, the loop.

Data flows one way: config -> data + model -> step -> checkpoint/metrics.

    from sessa_jax.train import load_config, train, load_model
    cfg = load_config("configs/quickstart.yaml", ["run.steps=100"])
    result = train(cfg)                       # RunResult(summary, stopped_by)
    model, cfg, step = load_model(cfg.run.output_dir)

Names are imported lazily, so ``sessa-train`` can install its signal handlers before JAX,
Orbax and Grain load (a few seconds in which SIGTERM would otherwise kill it silently).
"""

import importlib

_WHERE = {
    "CheckpointError": "checkpoint", "Checkpointer": "checkpoint", "load_model": "checkpoint",
    "CheckpointConfig": "config", "ConfigError": "config", "MeshConfig": "config",
    "OptimizerConfig": "config", "RunConfig": "config", "TrainConfig": "config",
    "from_dict": "config", "load_config": "config", "save_config": "config",
    "NonFiniteError": "loop", "RunResult": "loop", "evaluate_checkpoint": "loop",
    "train": "loop", "flops_per_token": "metrics", "peak_flops": "metrics",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"sessa_jax.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sessa_jax.train' has no attribute {name!r}")
