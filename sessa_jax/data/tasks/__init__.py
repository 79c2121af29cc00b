"""Synthetic long-context tasks, one module each (see each module's docstring for its layout
and vocabulary)."""

from sessa_jax.data.tasks.base import SPLIT_IDS, Task, example_rng, split_id
from sessa_jax.data.tasks.mqar import MQARTask
from sessa_jax.data.tasks.passkey import PasskeyTask
from sessa_jax.data.tasks.selective_copy import SelectiveCopyTask
from sessa_jax.data.tasks.symbol_soup import SymbolSoupTask

__all__ = [
    "SPLIT_IDS", "Task", "example_rng", "split_id",
    "MQARTask", "PasskeyTask", "SelectiveCopyTask", "SymbolSoupTask",
]
