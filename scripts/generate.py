#!/usr/bin/env python
"""Sample continuations of text prompts from a trained run or a randomly initialised model.

    # a training run directory (loaded by sessa_jax.train.checkpoint.load_model)
    python scripts/generate.py --checkpoint runs/sessa-125m --prompt "Once upon a time" \\
        --max-new-tokens 64 --temperature 0.8 --top-p 0.95

    # random weights, e.g. to smoke-test the generation path on CPU
    python scripts/generate.py --random --model configs/models/sessa-tiny.yaml --prompt Hi --greedy

    # a model trained on a synthetic task (e.g. the quickstart): its tokens are task ids, not
    # text; give ids, or let it answer held-out example N and compare with the expected answer
    python scripts/generate.py --checkpoint runs/quickstart --example 0 --greedy
    python scripts/generate.py --checkpoint runs/quickstart --prompt-ids 1,2,5,2,3 --greedy

Tokens are byte-level by default (byte b -> id b + 3; pad 0, bos 1, eos 2: see
sessa_jax/data/tokenizer.py); ``--tokenizer path.model`` uses a SentencePiece model instead.
Each prompt is encoded as [bos] + tokens; generation stops at eos (unless --ignore-eos).
Several ``--prompt`` (or ``--prompt-ids``) flags make one right-padded batch.

Exit codes: 0 done, 2 bad arguments (e.g. a text prompt for a task model), 4 unusable checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time


def load_checkpoint_model(run_dir: str, step=None):
    """(model, tokenizer spec or None, TrainConfig or None) of a training run, via
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
        print(f"generate.py: error: could not load {run_dir!r}: {' '.join(str(e).split())}",
              file=sys.stderr)
        raise SystemExit(4) from None
    parts = list(got) if isinstance(got, (tuple, list)) else [got]  # (model, TrainConfig, step)
    model = next((x for x in parts if isinstance(x, nnx.Module)), None)
    if model is None:
        raise SystemExit(f"{name}.load_model({run_dir!r}) returned no nnx.Module")
    spec, cfg = None, None
    for x in parts:
        data = getattr(x, "data", None)
        if data is not None:
            cfg = x
        if getattr(data, "task", None) == "text":
            spec = getattr(getattr(data, "text", None), "tokenizer", None)
    return model, spec, cfg


def _usage_error(msg: str):
    print(f"generate.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _parse_ids(text: str, vocab) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        _usage_error(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 1,4,5")
    if not ids:
        _usage_error(f"--prompt-ids {text!r}: no ids")
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        _usage_error(f"--prompt-ids {text!r}: ids must lie in [0, {vocab}) for this model")
    return ids


def task_example_prompt(cfg, index: int):
    """(prompt ids, expected answer ids, token names) of held-out example ``index`` of a task
    run: the prompt is the example up to its first scored position, the answer its scored
    targets (what a perfect model generates greedily from the prompt)."""
    import numpy as np
    from sessa_jax.data import make_task

    task = make_task(cfg.data)
    ex = task.example("valid", index)
    scored = np.flatnonzero(ex["loss_mask"] > 0)
    first = int(scored[0]) if scored.size else len(ex["inputs"]) - 1
    prompt = ex["inputs"][: first + 1].tolist()
    answer = ex["targets"][scored].tolist()
    return prompt, answer, task.token_names()


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
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="prompt as comma-separated token ids, e.g. 1,4,5 (repeatable); for "
                        "models trained on a synthetic task, whose tokens are not text")
    p.add_argument("--example", type=int, metavar="N",
                   help="task runs: prompt with held-out example N and show the expected answer")
    p.add_argument("--tokenizer", help="'bytes' or a SentencePiece .model (default: the "
                   "run's text tokenizer with --checkpoint, else bytes)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend bos")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 64 (with --example: the answer's length)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed (and init seed with --random)")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    args = p.parse_args(argv)

    given = sum(x is not None for x in (args.prompt, args.prompt_ids, args.example))
    if given != 1:
        _usage_error("give exactly one of --prompt TEXT, --prompt-ids 1,4,5 or --example N")

    from sessa_jax.console import one_line_warnings, quiet_logs
    one_line_warnings("generate.py")
    quiet_logs()
    import jax
    from flax import nnx

    from sessa_jax.generate import generate, pad_prompts
    from sessa_jax.models.lm import DecoderLM, count_params

    run_tok, run_cfg = None, None
    if args.random:
        if not args.model:
            p.error("--random needs --model configs/models/<name>.yaml")
        from sessa_jax.models.sizing import load_model_config

        cfg = load_model_config(args.model)
        model = DecoderLM(cfg, rngs=nnx.Rngs(args.seed))
    else:
        model, run_tok, run_cfg = load_checkpoint_model(args.checkpoint, args.step)
    vocab = model.embed.num_embeddings if hasattr(model, "embed") else None
    task_name = getattr(getattr(run_cfg, "data", None), "task", None)
    is_task = task_name not in (None, "text")

    names, answers = None, None
    if args.example is not None:
        if not is_task:
            _usage_error("--example needs a run trained on a synthetic task (data.task is "
                         f"{task_name!r}); use --prompt for text models")
        prompt, answer, names = task_example_prompt(run_cfg, args.example)
        ids, answers, labels = [prompt], [answer], [f"held-out example {args.example}"]
    elif args.prompt_ids:
        ids = [_parse_ids(t, vocab) for t in args.prompt_ids]
        labels = [f"ids {t}" for t in args.prompt_ids]
    else:
        if is_task:
            prompt, answer, _ = task_example_prompt(run_cfg, 0)
            _usage_error(
                f"{args.checkpoint} was trained on data.task={task_name!r}: its {vocab} token ids "
                "are task symbols, not text, so it can only continue task sequences. Try "
                f"--example 0 (prompt {','.join(map(str, prompt))}, expected answer "
                f"{','.join(map(str, answer))}) or --prompt-ids with ids in [0, {vocab})")
        tok = _load_tokenizer(args.tokenizer or run_tok or "bytes")
        if vocab is not None and vocab < tok.vocab_size:
            _usage_error(f"the model's vocab_size={vocab} is smaller than the tokenizer's "
                         f"({tok.vocab_size}); give --prompt-ids with ids in [0, {vocab})")
        ids = [([] if args.no_bos else [tok.bos_id]) + tok.encode(text).tolist()
               for text in args.prompt]
        labels = list(args.prompt)
    if args.prompt is None:  # ids in, ids out: the task's token names when it has them
        tok = None
        if is_task and names is None:
            from sessa_jax.data import make_task
            names = make_task(run_cfg.data).token_names()
    pad_id = tok.pad_id if tok is not None else 0
    eos_id = None if (args.ignore_eos or tok is None) else tok.eos_id
    prompts, lengths = pad_prompts(ids, pad_id=pad_id)
    print(f"model: {type(model).__name__} {getattr(model, 'cfg', None) and model.cfg.family}, "
          f"{count_params(model):,} parameters; batch {prompts.shape}", file=sys.stderr)

    t0 = time.perf_counter()
    out = generate(
        model, prompts, lengths,
        max_new_tokens=args.max_new_tokens or (max(map(len, answers)) if answers else 64),
        rng=jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, greedy=args.greedy,
        eos_id=eos_id, pad_id=pad_id,
    )
    toks = jax.device_get(out["tokens"])
    ns = jax.device_get(out["lengths"])
    dt = time.perf_counter() - t0
    for i, (label, row, n) in enumerate(zip(labels, toks, ns)):
        new = row[: int(n)]
        if tok is not None:
            print(f"=== prompt: {label!r}")
            print(label + tok.decode(new))
            if args.ids:
                print(f"ids: {new.tolist()}")
            continue
        show = (lambda xs: " ".join(names[j] if 0 <= j < len(names) else str(j) for j in xs)
                ) if names else (lambda xs: ",".join(map(str, xs)))
        print(f"=== prompt ({label}): {show(ids[i])}")
        print(f"generated ids: {','.join(map(str, new.tolist()))}")
        if names:
            print(f"generated:     {show(new.tolist())}")
        if answers:
            want = answers[i]
            got = new.tolist()[: len(want)]
            hits = sum(a == b for a, b in zip(got, want))
            print(f"expected:      {show(want)}  ({hits}/{len(want)} correct)")
    print(f"({int(ns.sum())} tokens in {dt:.2f}s, compilation included)", file=sys.stderr)


if __name__ == "__main__":
    main()
