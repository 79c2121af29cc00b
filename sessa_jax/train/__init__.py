"""Training for sessa_jax: configs, mesh, train state, jitted steps, checkpoints, the loop.

Data flows one way: config -> data + model -> step -> checkpoint/metrics.

    from sessa_jax.train import load_config, train, load_model
    cfg = load_config("configs/quickstart.yaml", ["run.steps=100"])
    result = train(cfg)                       # RunResult(summary, stopped_by)
    model, cfg, step = load_model(cfg.run.output_dir)
"""

from sessa_jax.train.checkpoint import CheckpointError, Checkpointer, load_model
from sessa_jax.train.config import (
    CheckpointConfig, ConfigError, MeshConfig, OptimizerConfig, RunConfig, TrainConfig,
    from_dict, load_config, save_config,
)
from sessa_jax.train.loop import NonFiniteError, RunResult, evaluate_checkpoint, train
from sessa_jax.train.metrics import flops_per_token, peak_flops

__all__ = [
    "CheckpointConfig", "CheckpointError", "Checkpointer", "ConfigError", "MeshConfig",
    "NonFiniteError", "OptimizerConfig", "RunConfig", "RunResult", "TrainConfig",
    "evaluate_checkpoint", "flops_per_token", "from_dict", "load_config", "load_model",
    "peak_flops", "save_config", "train",
]
