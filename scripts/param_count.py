#!/usr/bin/env python
"""Parameter counts of model configs, and width-matched configs across families.

    # exact counts (analytic; --check also builds the model abstractly with nnx.eval_shape)
    python scripts/param_count.py --config configs/models/sessa-125m.yaml [--check]

    # d_model per family so that each is within 2% of a target at a fixed depth, as YAML
    python scripts/param_count.py --target 125e6 --layers 12 --vocab-size 50304 \\
        --mlp-ratio transformer=2.6666666666666665 [--write-dir configs/models --suffix 125m]

``--mlp-ratio`` takes one number for every family, or ``family=value,...`` for some; a family
not named keeps the ModelConfig default (no MLP), which match_widths may only change as a last
resort (it says so). The chosen configs go to stdout as YAML documents, with their counts and
any such notes as comments.
"""

from __future__ import annotations

import argparse
import os
import sys

from sessa_jax.models.sizing import (
    FAMILIES, abstract_param_count, config_to_yaml, load_model_config, match_widths,
    param_breakdown,
)


def _per_family(text: str, cast):
    """'2.5' -> 2.5 for every family; 'transformer=2.5,sessa=0' -> {family: value}."""
    if "=" not in text:
        return cast(text)
    out = {}
    for part in text.split(","):
        fam, _, val = part.partition("=")
        fam = fam.strip()
        if fam not in FAMILIES:
            raise SystemExit(f"--mlp-ratio: unknown family {fam!r} (expected {FAMILIES})")
        out[fam] = cast(val)
    return out


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def show_config(path: str, check: bool) -> None:
    cfg = load_model_config(path)
    parts = param_breakdown(cfg)
    print(f"{path}: {cfg.family}, {parts['total']:,} parameters ({_human(parts['total'])})")
    for k, v in parts.items():
        if k != "total" and v:
            print(f"  {k:9s} {v:>14,}")
    non_embed = parts["total"] - parts["embed"] - parts["lm_head"]
    print(f"  {'non-embed':9s} {non_embed:>14,}")
    if check:
        got = abstract_param_count(cfg)
        status = "matches" if got == parts["total"] else "DIFFERS"
        print(f"  eval_shape count {got:,} ({status})")
        if got != parts["total"]:
            sys.exit(1)


def show_matches(args) -> None:
    fixed = dict(vocab_size=args.vocab_size, tie_embeddings=not args.untied)
    if args.mlp_ratio is not None:
        fixed["mlp_ratio"] = _per_family(args.mlp_ratio, float)
    if args.n_heads is not None:
        fixed["n_heads"] = args.n_heads
    if args.n_kv_heads is not None:
        fixed["n_kv_heads"] = args.n_kv_heads
    matches = match_widths(args.target, args.layers, args.families, tol=args.tol, **fixed)
    docs = []
    for fam, m in matches.items():
        comments = [
            f"{fam}: {m.params:,} parameters ({_human(m.params)}), "
            f"{m.rel_err:+.2%} vs target {args.target:,.0f}",
            f"made by: scripts/param_count.py {' '.join(sys.argv[1:])}",
        ] + [f"note: {n}" for n in m.notes]
        text = config_to_yaml(m.config, comments)
        docs.append(text)
        for n in m.notes:
            print(f"[{fam}] {n}", file=sys.stderr)
        if args.write_dir:
            os.makedirs(args.write_dir, exist_ok=True)
            path = os.path.join(args.write_dir, f"{fam}-{args.suffix}.yaml")
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path}", file=sys.stderr)
    print("---\n".join(docs), end="")
    if any(abs(m.rel_err) > args.tol for m in matches.values()):
        sys.exit(2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", help="model YAML file(s) to count")
    p.add_argument("--check", action="store_true",
                   help="also count with nnx.eval_shape (no allocation) and compare")
    p.add_argument("--target", type=float, help="target parameter count, e.g. 125e6")
    p.add_argument("--layers", type=int, help="n_layers for every family (with --target)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied)")
    p.add_argument("--mlp-ratio", help="'R' for all families or 'family=R,...'")
    p.add_argument("--n-heads", type=int, help="fix n_heads (default: head_dim 64 at scale)")
    p.add_argument("--n-kv-heads", type=int, help="fix n_kv_heads (GQA)")
    p.add_argument("--tol", type=float, default=0.02, help="relative tolerance (0.02 = 2%%)")
    p.add_argument("--write-dir", help="also write <family>-<suffix>.yaml files here")
    p.add_argument("--suffix", default="matched", help="file name suffix for --write-dir")
    args = p.parse_args(argv)
    if not args.config and args.target is None:
        p.error("give --config FILE(s) or --target N --layers L")
    if args.config:
        for path in args.config:
            show_config(path, args.check)
    if args.target is not None:
        if args.layers is None:
            p.error("--target needs --layers")
        show_matches(args)


if __name__ == "__main__":
    main()
