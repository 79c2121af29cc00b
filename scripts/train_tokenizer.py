#!/usr/bin/env python
"""Train a byte-level BPE ``tokenizer.json`` on local files with Hugging Face ``tokenizers``.

    python scripts/train_tokenizer.py --input 'corpus/**/*.py' --output tokenizer.json \\
        --vocab-size 8192

No hub access needed. Reads the same inputs as preparation (text files, JSONL ``--field``,
Parquet column; globbed; ``--document line`` for one document per line), streaming. The
specials come first: 0 <pad>, 1 <bos>, 2 <eos>. Byte-level: any text encodes (no unknown
token) and every token stands for a whole number of bytes (exact bits per byte). Use it with
``data.text.tokenizer=tokenizer.json`` / ``sessa-prepare --tokenizer tokenizer.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from sessa_jax.data.errors import DataError
from sessa_jax.data.sources import (
    DOCUMENT_UNITS, FORMATS, BadFile, check_file, expand_paths, read_documents,
)

SPECIALS = ["<pad>", "<bos>", "<eos>"]


def documents(patterns, fmt, field, document, on_bad_file, skipped):
    files, problems = expand_paths(patterns)
    for p in problems:
        if on_bad_file == "error":
            raise DataError(f"{p['path']}: {p['reason']}")
        skipped.append(p)
    for path in files:
        try:
            check_file(path, fmt, field, document)
        except BadFile as e:
            if on_bad_file == "error":
                raise
            skipped.append({"path": e.path, "reason": e.reason})
            continue
        yield from read_documents(path, fmt, field, document)


def train_bpe(patterns, vocab_size: int, *, fmt="auto", field="text", document="file",
              on_bad_file="error", min_frequency: int = 2):
    """-> (tokenizers.Tokenizer, skipped files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    skipped: list = []
    tok.train_from_iterator(documents(patterns, fmt, field, document, on_bad_file, skipped),
                            trainer)
    return tok, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, metavar="GLOB")
    ap.add_argument("--output", required=True, help="tokenizer.json to write")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--field", default="text")
    ap.add_argument("--document", default="file", choices=DOCUMENT_UNITS)
    ap.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    args = ap.parse_args(argv)
    if args.vocab_size < len(SPECIALS) + 256:
        print(f"train_tokenizer: error: --vocab-size {args.vocab_size}: expected at least "
              f"{len(SPECIALS) + 256} (specials + 256 bytes)", file=sys.stderr)
        return 2
    try:
        tok, skipped = train_bpe(args.input, args.vocab_size, fmt=args.format, field=args.field,
                                 document=args.document, on_bad_file=args.on_bad_file,
                                 min_frequency=args.min_frequency)
    except DataError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    from etils import epath
    epath.Path(args.output).write_text(tok.to_str())
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(json.dumps({"output": args.output, "vocab_size": tok.get_vocab_size(),
                      "files_skipped": len(skipped)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
