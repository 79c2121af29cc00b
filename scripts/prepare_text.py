#!/usr/bin/env python
"""Prepare a text corpus for training: the same as the ``sessa-prepare`` command.

    python scripts/prepare_text.py --input 'corpus/**/*.txt' --output data/corpus \\
        --tokenizer tokenizer.json --workers 2

Streams text / JSONL / Parquet files through tokenizer worker processes into ArrayRecord
document shards + meta.json (see :mod:`sessa_jax.data.prepare`); a killed run resumes when run
again. Point ``data.text.paths`` at DIR to train on it with any seq_len. Bad input exits with
status 2 and one line naming the file, unless ``--on-bad-file skip`` (then it is listed).
"""

import sys

from sessa_jax.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
