#!/usr/bin/env python
"""Tokenize local text files, pack them into rows of seq_len+1 tokens, write ArrayRecord shards.

    python scripts/prepare_text.py --input 'corpus/*.txt' --output data/corpus --seq-len 1024

Writes DIR/{train,valid}-XXXXX-of-YYYYY.array_record (records: rows of seq_len+1 little-endian
int32 tokens, ``ndarray.tobytes()``) and DIR/meta.json (seq_len, tokenizer, vocab_size, special
ids, row counts, files read/skipped and why). Point ``data.text.paths`` at DIR to train on it.
Bad input exits with status 2 and a message naming the file and the problem, unless
``--on-bad-file skip`` (then bad files are counted in meta.json and skipped).
"""

from __future__ import annotations

import argparse
import json
import sys

from sessa_jax.data.errors import DataError
from sessa_jax.data.text import prepare_text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                    help="text files or globs (quote globs so that this script expands them)")
    ap.add_argument("--output", required=True, metavar="DIR", help="output directory")
    ap.add_argument("--seq-len", type=int, required=True, help="model input length T")
    ap.add_argument("--tokenizer", default="bytes",
                    help="'bytes' (default) or a SentencePiece .model path")
    ap.add_argument("--valid-fraction", type=float, default=0.01,
                    help="share of rows held out as the valid split (default 0.01)")
    ap.add_argument("--records-per-shard", type=int, default=4096)
    ap.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a corpus already prepared in --output")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = prepare_text(
            args.input, args.output, args.seq_len, tokenizer=args.tokenizer,
            valid_fraction=args.valid_fraction, records_per_shard=args.records_per_shard,
            on_bad_file=args.on_bad_file, overwrite=args.overwrite,
        )
    except (DataError, ValueError) as e:
        print(f"prepare_text: error: {e}", file=sys.stderr)
        return 2
    summary = {k: meta[k] for k in ("seq_len", "tokenizer", "vocab_size", "rows", "files_read",
                                    "files_skipped", "tokens")}
    print(json.dumps(summary))
    for s in meta["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
