"""``sessa-import``: a Hugging Face directory of this architecture -> a run that sessa-train continues.

    sessa-import --hf exports/x-hf --out runs/x-ft [--config configs/tasks/mqar-sessa.yaml] [k=v ...]
    sessa-train --config runs/x-ft/config.yaml [run.steps=...]

The directory may be a ``sessa-export --format hf`` export or any checkpoint with the same names
(e.g. the PyTorch model's ``save_pretrained`` after fine-tuning elsewhere). The model section of
the run's config comes from its config.json; data, optimizer, run and mesh come from
``--config`` (default: all defaults) and ``key=value`` overrides. The run directory gets
``config.yaml`` and an Orbax checkpoint at step 0 holding the imported parameters and a fresh
optimizer state, so ``sessa-train`` resumes from it like from any of its own checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from sessa_jax.export.core import ExportError


def _check_same_shapes(params, abstract, hf_dir: str) -> None:
    """The run's model (after overrides) must hold exactly the imported tensors."""
    from sessa_jax.export.core import flatten_params

    got = {k: tuple(v.shape) for k, v in flatten_params(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten_params(abstract).items()}
    if got == want:
        return
    parts = []
    if set(want) - set(got):
        parts.append("missing: " + ", ".join(sorted(set(want) - set(got))))
    if set(got) - set(want):
        parts.append("unexpected: " + ", ".join(sorted(set(got) - set(want))))
    bad = [f"{k}: run expects {want[k]}, checkpoint has {got[k]}"
           for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if bad:
        parts.append("wrong shape: " + "; ".join(bad))
    raise ExportError(f"{hf_dir}: the run's model config does not match the checkpoint's "
                      "tensors (a model.* override changed the architecture?)\n  "
                      + "\n  ".join(parts))


def import_hf(hf_dir: str, run_dir: str, *, config: Optional[str] = None,
              overrides: Sequence[str] = ()) -> dict:
    """Make ``run_dir`` a training run at step 0 holding the parameters of ``hf_dir``.

    Returns {"run_dir", "config", "n_params", "model"}. Raises ExportError (bad checkpoint,
    or ``run_dir`` already has checkpoints) or ConfigError (bad config / overrides).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sessa_jax.export.hf import read_hf
    from sessa_jax.models.layout import to_layout
    from sessa_jax.train.checkpoint import Checkpointer, checkpoint_dir
    from sessa_jax.train.config import (
        MeshConfig, apply_overrides, from_dict, read_yaml, replace, save_config, to_dict,
    )
    from sessa_jax.train.mesh import make_mesh
    from sessa_jax.train.state import TrainState, make_setup

    from sessa_jax.export.core import out_path

    run_dir = out_path(run_dir)
    ck_dir = checkpoint_dir(run_dir)
    if ck_dir.is_dir() and any(ck_dir.iterdir()):
        raise ExportError(f"{run_dir}: already holds checkpoints ({ck_dir}); import into a new "
                          "directory")
    model_cfg, params, _ = read_hf(hf_dir)

    raw = read_yaml(config) if config else {}
    base_dir = str(out_path(config).parent) if config else "."
    raw["model"] = to_dict(model_cfg)
    raw = apply_overrides(raw, overrides)
    raw.setdefault("run", {})
    if not isinstance(raw["run"], dict):
        raw["run"] = {}
    raw["run"]["output_dir"] = str(run_dir)
    cfg = from_dict(raw, base_dir)

    # Write on one device: Orbax restores onto whatever mesh the continuing run uses.
    one = MeshConfig(data=1, fsdp=1, tensor=1, rules=cfg.mesh.rules)
    mesh = make_mesh(one, devices=jax.devices()[:1])
    setup = make_setup(replace(cfg, mesh=one), mesh)
    params = to_layout(params, cfg.model.scan_layers)  # e.g. model.scan_layers=true override
    _check_same_shapes(params, setup.abstract.params, hf_dir)
    params = jax.tree.map(lambda a, s: np.asarray(a).astype(s.dtype), params,
                          setup.abstract.params)
    params = jax.device_put(params, setup.shardings.params)

    def fresh(p):  # as make_setup's init_fn, with the imported parameters
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params=p, opt_state=setup.tx.init(p), step=zero,
                          rng=jax.random.PRNGKey(cfg.run.seed + 1), skipped=zero, streak=zero)

    state = jax.jit(fresh, out_shardings=setup.shardings)(params)
    run_dir.mkdir(parents=True, exist_ok=True)
    ck = Checkpointer(run_dir, cfg.checkpoint)
    try:
        ck.save(0, state, cfg)
        ck.wait()
    finally:
        ck.close()
    cfg_path = run_dir / "config.yaml"
    save_config(cfg, cfg_path)
    n = int(sum(np.size(a) for a in jax.tree.leaves(params)))
    (run_dir / "imported_from.json").write_text(
        json.dumps({"hf_dir": str(out_path(hf_dir)), "n_params": n}, indent=1), encoding="utf-8")
    return {"run_dir": str(run_dir), "config": str(cfg_path), "n_params": n, "model": cfg.model}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="sessa-import",
        description="Turn a Hugging Face checkpoint of this architecture into a training run "
                    "directory (step 0) that sessa-train continues.",
        epilog="Overrides: key.sub=value as for sessa-train, e.g. run.steps=1000 "
               "optimizer.lr=1e-4 model.feedback_impl=dense")
    p.add_argument("--hf", required=True, help="Hugging Face directory (config.json + "
                   "safetensors), e.g. from sessa-export --format hf")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--config", help="training config YAML for data/optimizer/run (its model "
                   "section is replaced by the checkpoint's)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)

    from sessa_jax.data import DataError
    from sessa_jax.train.checkpoint import CheckpointError
    from sessa_jax.train.config import ConfigError

    try:
        r = import_hf(args.hf, args.out, config=args.config, overrides=args.overrides)
    except (ExportError, ConfigError, CheckpointError, DataError) as e:
        msg = " ".join(str(e).split("\n"))
        print(f"sessa-import: error: {msg}", file=sys.stderr)
        return 2
    print(f"imported {r['n_params']:,} parameters ({r['model'].family}, d_model "
          f"{r['model'].d_model}, {r['model'].n_layers} layers) as step 0 of {r['run_dir']}; "
          f"continue with: sessa-train --config {r['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
