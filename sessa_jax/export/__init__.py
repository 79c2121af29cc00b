"""Export trained parameters as safetensors + config.json, and load them back.

    sessa-export --run runs/x --out exports/x [--step N] [--dtype bf16|fp32] [--max-shard-size 2GB]

    from sessa_jax.export import load_pretrained
    model = load_pretrained("exports/x")                 # one device
    model = load_pretrained("exports/x", mesh=mesh)      # sharded by the logical axis rules

An export holds parameters only (no optimizer state, no pickle): ``config.json`` (the
ModelConfig fields) and either ``model.safetensors`` or numbered shards
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``.
"""

from sessa_jax.export.core import (
    CONFIG_NAME, FORMAT, INDEX_NAME, ExportError, export_params, export_run, flatten_params,
    load_pretrained, parse_size, read_export_config,
)

__all__ = [
    "CONFIG_NAME", "FORMAT", "INDEX_NAME", "ExportError", "export_params", "export_run",
    "flatten_params", "load_pretrained", "parse_size", "read_export_config",
]
