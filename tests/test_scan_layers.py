"""Scanned layers (model.scan_layers): the same model as the per-block loop, in another layout.

- init: the scanned parameters are the unscanned ones stacked, bit for bit (same seed);
- logits and gradients agree (float32, 1e-6) for every family, with and without MLP blocks,
  remat none and full (three configs covering those); the parameter count and the weight-decay
  mask are unchanged;
- logical specs carry the 'layers' axis first;
- a checkpoint saved scanned restores unscanned (state and params-only) and vice versa, a
  resume across layouts is accepted, exports are per layer whatever the flag;
- greedy generation gives the same tokens for both layouts.
Tiny models (2 layers, D 16), each function compiled once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sessa_jax.models.config import ModelConfig
from sessa_jax.models.layout import is_scanned, stack_layers, to_layout, unstack_layers
from sessa_jax.models.lm import DecoderLM, count_params

# the layers' inner implementations are beside the point here: the cheapest to compile
TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, chunk_size=4,
            feedback_impl="dense", scan_impl="sequential", tie_embeddings=False)


def pair(**kw):
    cfg = ModelConfig(**{**TINY, **kw})
    return (DecoderLM(cfg, rngs=nnx.Rngs(0)),
            DecoderLM(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def loss_and_grads(model, tokens, segment_ids=None):
    """(logits, grads) of a scalar loss, jitted once per model structure."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def f(params):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, segment_ids=segment_ids)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
        (_, logits), g = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, g

    logits, g = f(params)
    return logits, nnx.to_pure_dict(g)


# Every family, MLP blocks on and off, remat none and full (not the whole grid: compile time).
@pytest.mark.parametrize("family,mlp_ratio,remat", [
    ("sessa", 2.0, "full"), ("transformer", 0.0, "none"), ("mamba", 0.0, "full"),
])
def test_same_init_logits_and_gradients(family, mlp_ratio, remat):
    flat, scan = pair(family=family, mlp_ratio=mlp_ratio, remat=remat)
    pf, ps = params_of(flat), params_of(scan)
    assert not is_scanned(pf) and is_scanned(ps)
    assert_trees_equal(stack_layers(pf), ps)  # exact: layer i drew block i's keys
    assert_trees_equal(unstack_layers(ps), pf)
    assert count_params(flat) == count_params(scan)

    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY["vocab_size"])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8], jnp.int32)  # packed rows: side input
    lf, gf = loss_and_grads(flat, tokens, seg)
    ls, gs = loss_and_grads(scan, tokens, seg)
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lf), rtol=0, atol=1e-6)
    assert_trees_equal(unstack_layers(gs), gf, atol=1e-6)


def test_specs_decay_mask_and_layout_helpers():
    from sessa_jax.models.partitioning import DEFAULT_RULES, logical_to_mesh
    from sessa_jax.train.state import abstract_model, decay_mask

    cfg = ModelConfig(**{**TINY, "mlp_ratio": 2.0})
    _, abs_f, spec_f = abstract_model(cfg)
    _, abs_s, spec_s = abstract_model(dataclasses.replace(cfg, scan_layers=True))
    k_f = spec_f["blocks"][0]["mixer"]["W_in"]["kernel"]
    k_s = spec_s["blocks"]["mixer"]["W_in"]["kernel"]
    assert tuple(k_s) == ("layers",) + tuple(k_f)
    assert tuple(spec_s["blocks"]["mixer"]["mixer"]["gamma_bias"]) == ("layers",)  # scalar
    assert tuple(logical_to_mesh(tuple(k_s), DEFAULT_RULES)) == (None, "fsdp", "tensor")
    assert jax.tree.map(lambda a: a.shape, stack_layers(abs_f)) == \
        jax.tree.map(lambda a: a.shape, abs_s)
    # LayerNorm scales stacked to (L, D) are still not decayed; kernels (L, D, 2D) are.
    mask_f, mask_s = decay_mask(abs_f), decay_mask(abs_s)
    want = jax.tree.leaves(mask_f["blocks"][0])
    assert jax.tree.leaves(mask_s["blocks"]) == want and any(want) and not all(want)
    assert jax.tree.leaves(mask_f["blocks"][1]) == want
    assert {k: v for k, v in mask_s.items() if k != "blocks"} == \
        {k: v for k, v in mask_f.items() if k != "blocks"}
    assert to_layout(abs_s, False).keys() == abs_f.keys()


def _train_cfg(run_dir, scan: bool):
    from sessa_jax.train.config import from_dict

    return from_dict({
        "model": {"family": "transformer", "d_model": 16, "n_layers": 2, "n_heads": 2,
                  "scan_layers": scan},
        "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
        "checkpoint": {"every_steps": 1, "async_save": False},
        "mesh": {"data": 1},
        "run": {"steps": 2, "global_batch_size": 8, "tensorboard": False,
                "output_dir": str(run_dir)},
    })


def _host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_checkpoint_restores_across_layouts(tmp_path, saved_scanned):
    from sessa_jax.export.core import export_params, flatten_params
    from sessa_jax.train.checkpoint import Checkpointer, load_model
    from sessa_jax.train.config import check_resume_compatible
    from sessa_jax.train.mesh import make_mesh
    from sessa_jax.train.state import abstract_with_shardings, init_state, make_setup

    run = tmp_path / "run"
    cfg_a, cfg_b = _train_cfg(run, saved_scanned), _train_cfg(run, not saved_scanned)
    mesh = make_mesh(cfg_a.mesh)
    setup_a, setup_b = make_setup(cfg_a, mesh), make_setup(cfg_b, mesh)
    state = init_state(setup_a)
    # distinct moments, so a mix-up of mu/nu or of layers would show
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32
                                                 else x, state.opt_state),
                          step=jnp.int32(1))
    ck = Checkpointer(str(run), cfg_a.checkpoint)
    ck.save(1, state, cfg_a)
    ck.wait()
    saved = _host(state)

    check_resume_compatible(cfg_a, cfg_b)  # scan_layers alone may change on resume
    got, meta, s = ck.restore(abstract_with_shardings(setup_b))
    assert s == 1 and meta["model"]["scanned"] is saved_scanned
    assert is_scanned(got.params) is (not saved_scanned)
    assert_trees_equal(_host(got), to_layout(saved, not saved_scanned))
    params, _, _ = ck.restore_params(abstract_with_shardings(setup_b).params)
    assert_trees_equal(_host(params), to_layout(saved.params, not saved_scanned))
    ck.close()

    # load_model rebuilds the run's own layout; its export is per layer either way.
    model, _, _ = load_model(str(run))
    assert model.cfg.scan_layers is saved_scanned
    summary = export_params(params_of(model), model.cfg, str(tmp_path / "exp"))
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "exp" / summary["files"][0]))
    assert set(tensors) == set(flatten_params(unstack_layers(saved.params)))
    assert "blocks.1.mixer.attn.q_proj.kernel" in tensors


def test_generate_same_tokens_for_both_layouts():
    from sessa_jax.generate import generate, pad_prompts

    flat, scan = pair(family="sessa", mlp_ratio=2.0)  # the largest cache (k, v, k_b, s)
    prompts, lengths = pad_prompts([[1, 5, 7, 3], [2, 9]])
    a = generate(flat, prompts, lengths, max_new_tokens=5, greedy=True)
    b = generate(scan, prompts, lengths, max_new_tokens=5, greedy=True)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    cache = scan.init_cache(2, 9)  # one stacked cache: leading layers axis
    assert all(x.shape[0] == TINY["n_layers"] for x in jax.tree.leaves(cache))
    # running the stack (several scans) leaves every spec with its layers axis, scalars too
    spec = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(scan, nnx.Param)))["blocks"]
    assert all(tuple(p)[0] == "layers" for p in jax.tree.leaves(
        spec, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
