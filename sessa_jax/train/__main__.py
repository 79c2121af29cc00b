"""``python -m sessa_jax.train [--config PATH] [key=value ...]`` is ``sessa-train``."""

import sys

from sessa_jax.train.cli import train_main

sys.exit(train_main())
