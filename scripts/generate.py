#!/usr/bin/env python
"""Sample continuations of text prompts from a trained run or a randomly initialised model.

    # a training run directory (loaded by sessa_jax.train.checkpoint.load_model)
    python scripts/generate.py --checkpoint runs/sessa-125m --prompt "Once upon a time" \\
        --max-new-tokens 64 --temperature 0.8 --top-p 0.95

    # random weights, e.g. to smoke-test the generation path on CPU
    python scripts/generate.py --random --model configs/models/sessa-tiny.yaml --prompt Hi --greedy

Tokens are byte-level by default (byte b -> id b + 3; pad 0, bos 1, eos 2: see
sessa_jax/data/tokenizer.py); ``--tokenizer path.model`` uses a SentencePiece model instead.
Each prompt is encoded as [bos] + tokens; generation stops at eos (unless --ignore-eos).
Several ``--prompt`` flags make one right-padded batch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time


def load_checkpoint_model(run_dir: str, step=None):
    """(model, tokenizer spec or None) of a training run, via
    sessa_jax.train.checkpoint.load_model if it exists. The tokenizer spec is the run's
    ``data.text.tokenizer`` when its config has one."""
    name = "sessa_jax.train.checkpoint"
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    mod = importlib.import_module(name) if found else None
    if mod is None or not hasattr(mod, "load_model"):
        raise SystemExit(
            f"--checkpoint needs {name}.load_model(run_dir, step=None), which this checkout "
            "does not have yet; use --random --model configs/models/<name>.yaml to try "
            "generation with random weights."
        )
    from flax import nnx

    try:
        got = mod.load_model(run_dir, step=step)
    except Exception as e:  # the loader's own errors say what is wrong with the directory
        raise SystemExit(f"could not load {run_dir!r}: {type(e).__name__}: {e}") from None
    parts = list(got) if isinstance(got, (tuple, list)) else [got]  # (model, TrainConfig, step)
    model = next((x for x in parts if isinstance(x, nnx.Module)), None)
    if model is None:
        raise SystemExit(f"{name}.load_model({run_dir!r}) returned no nnx.Module")
    spec = None
    for x in parts:
        data = getattr(x, "data", None)
        if getattr(data, "task", None) == "text":
            spec = getattr(getattr(data, "text", None), "tokenizer", None)
    return model, spec


class _Bytes:
    """The byte tokenizer's id layout (sessa_jax/data/tokenizer.py: pad 0, bos 1, eos 2,
    byte b -> b + 3), for machines where sessa_jax.data cannot be imported (its package
    imports Grain)."""

    pad_id, bos_id, eos_id, offset, vocab_size = 0, 1, 2, 3, 259

    def encode(self, text):
        import numpy as np

        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def decode(self, ids):
        ids = [int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size]
        return bytes(ids).decode("utf-8", errors="replace")


def _load_tokenizer(spec: str):
    try:
        from sessa_jax.data.tokenizer import load_tokenizer
    except ImportError as e:
        if spec != "bytes":
            raise SystemExit(f"--tokenizer {spec!r} needs sessa_jax.data, which failed: {e}")
        return _Bytes()
    return load_tokenizer(spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="training run directory")
    src.add_argument("--random", action="store_true", help="random weights (needs --model)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--model", help="model YAML (flat ModelConfig fields), with --random")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--tokenizer", help="'bytes' or a SentencePiece .model (default: the "
                   "run's text tokenizer with --checkpoint, else bytes)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend bos")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed (and init seed with --random)")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    from sessa_jax.generate import generate, pad_prompts
    from sessa_jax.models.lm import DecoderLM, count_params

    run_tok = None
    if args.random:
        if not args.model:
            p.error("--random needs --model configs/models/<name>.yaml")
        from sessa_jax.models.sizing import load_model_config

        cfg = load_model_config(args.model)
        model = DecoderLM(cfg, rngs=nnx.Rngs(args.seed))
    else:
        model, run_tok = load_checkpoint_model(args.checkpoint, args.step)
    tok = _load_tokenizer(args.tokenizer or run_tok or "bytes")
    vocab = model.embed.num_embeddings if hasattr(model, "embed") else None
    if vocab is not None and vocab < tok.vocab_size:
        raise SystemExit(
            f"the model's vocab_size={vocab} is smaller than the tokenizer's "
            f"({tok.vocab_size}); byte-level prompts need vocab_size >= 259"
        )

    ids = [([] if args.no_bos else [tok.bos_id]) + tok.encode(text).tolist()
           for text in args.prompt]
    prompts, lengths = pad_prompts(ids, pad_id=tok.pad_id)
    print(f"model: {type(model).__name__} {getattr(model, 'cfg', None) and model.cfg.family}, "
          f"{count_params(model):,} parameters; batch {prompts.shape}", file=sys.stderr)

    t0 = time.perf_counter()
    out = generate(
        model, prompts, lengths, max_new_tokens=args.max_new_tokens,
        rng=jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, greedy=args.greedy,
        eos_id=None if args.ignore_eos else tok.eos_id, pad_id=tok.pad_id,
    )
    toks = jax.device_get(out["tokens"])
    ns = jax.device_get(out["lengths"])
    dt = time.perf_counter() - t0
    for text, row, n in zip(args.prompt, toks, ns):
        new = row[: int(n)]
        print(f"=== prompt: {text!r}")
        print(text + tok.decode(new))
        if args.ids:
            print(f"ids: {new.tolist()}")
    print(f"({int(ns.sum())} tokens in {dt:.2f}s, compilation included)", file=sys.stderr)


if __name__ == "__main__":
    main()
