"""Grain pipelines whose position is a pure function of (seed, global step).

Global batch at step s holds the examples at global positions g = s*G .. s*G + G - 1 of the
split (G = global batch size). Position g maps to an example index by wrapping around the split
(size N): epoch, i = divmod(g, N), then, when shuffling, i goes through a permutation of [0, N)
keyed by (seed, epoch) (a Feistel network: O(1) memory, any N). Process p of P takes the
contiguous rows [p*G/P, (p+1)*G/P) of each global batch. So a resumed run sees exactly the
batches of an uninterrupted one, on any number of processes, with no iterator state to save:
restart with ``start_step``.

Grain layout: ``MapDataset.source(IndexPlan)`` (slot j -> example index, pure arithmetic)
``.map(generate)`` (the task's ``example(split, index)``) ``.batch(L)``, so ``ds[step]`` is this
process's batch at that step. ``batches`` slices the example-level dataset at the start step and
reads it with Grain's thread pool (``to_iter_dataset(ReadOptions(...))``), then batches.

Batches are dicts of stacked NumPy arrays: ``inputs`` int32 (L, T), ``targets`` int32 (L, T),
``loss_mask`` float32 (L, T), with L = G / P; text adds ``segment_ids`` and ``positions`` int32
(L, T) (see :mod:`sessa_jax.data.packing`). Each process reads only the rows of its own slice.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Iterator, Optional

import grain

from sessa_jax.data.config import DataConfig
from sessa_jax.data.errors import DataError
from sessa_jax.data.tasks.base import Task, split_id

# Length of the train index plan in steps: effectively unbounded (indices are Python ints).
FOREVER_STEPS = 2**40

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finalizer: a cheap, well-mixing 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute_index(i: int, n: int, seed: int, epoch: int, rounds: int = 4) -> int:
    """Image of i under a pseudo-random permutation of [0, n) keyed by (seed, epoch).

    A balanced Feistel network on the smallest even-bit domain >= n, with cycle walking until
    the value falls back in [0, n) (at most ~4 tries on average).
    """
    if not 0 <= i < n:
        raise IndexError(f"index {i} outside [0, {n})")
    if n == 1:
        return 0
    bits = (n - 1).bit_length()
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    keys = [_mix64(_mix64(seed) ^ _mix64(epoch + 1) ^ r) for r in range(rounds)]
    x = i
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        x = (left << half) | right
        if x < n:
            return x


def make_task(data_cfg: DataConfig) -> Task:
    """The task object of a DataConfig (vocab_size, pad_id, example(split, index), ...).

    Building a text task reads (or opens) its corpus; build it once and pass it on.
    """
    # Imported here so that importing the pipeline does not import every task.
    if data_cfg.task == "symbol_soup":
        from sessa_jax.data.tasks.symbol_soup import SymbolSoupTask as cls
    elif data_cfg.task == "mqar":
        from sessa_jax.data.tasks.mqar import MQARTask as cls
    elif data_cfg.task == "selective_copy":
        from sessa_jax.data.tasks.selective_copy import SelectiveCopyTask as cls
    elif data_cfg.task == "passkey":
        from sessa_jax.data.tasks.passkey import PasskeyTask as cls
    elif data_cfg.task == "text":
        from sessa_jax.data.text import TextTask as cls
    else:  # DataConfig already validated it
        raise ValueError(f"data.task={data_cfg.task!r}: unknown task")
    return cls(data_cfg)


def task_vocab_size(data_cfg: DataConfig) -> int:
    """The task's vocabulary without building a text task (reads only the tokenizer/meta)."""
    if data_cfg.task == "text":
        from sessa_jax.data.text import text_vocab_size
        return text_vocab_size(data_cfg.text)
    return make_task(data_cfg).vocab_size  # synthetic tasks are cheap to build


def _local_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r}: expected a positive integer")
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count={process_count!r}: expected a positive integer")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r}: expected an integer in [0, {process_count})"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


class IndexPlan:
    """Random-access source: slot j of this process -> example index (or -1 for padding).

    Slot j is row j % L of step j // L; its global position is step*G + process_index*L + row.
    Train plans wrap around the split (optionally permuted per epoch); eval plans (``wrap=False``)
    cover positions 0..N-1 once and give -1 past the end, for padding rows.
    """

    def __init__(self, split_size: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, shuffle: bool = False,
                 num_steps: int = FOREVER_STEPS, wrap: bool = True):
        self.local = _local_batch(global_batch_size, process_index, process_count)
        if split_size < 1:
            raise ValueError("the split is empty: nothing to read")
        self.n, self.g, self.p = split_size, global_batch_size, process_index
        self.seed, self.shuffle, self.wrap = seed, shuffle, wrap
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps * self.local

    def position(self, j: int) -> int:
        step, row = divmod(j, self.local)
        return step * self.g + self.p * self.local + row

    def __getitem__(self, j) -> int:
        g = self.position(int(j))
        if not self.wrap:
            return g if g < self.n else -1
        epoch, i = divmod(g, self.n)
        return permute_index(i, self.n, self.seed, epoch) if self.shuffle else i


_SKIP_LOCK = threading.Lock()


class _Generate:
    """Example index -> example dict (an all-pad, unscored example for index -1).

    An unreadable record (DataError) propagates, or with ``data.on_bad_record='skip'`` becomes
    an all-pad, unscored example, is warned about once and counted in ``task.skipped_records``
    (so batch shapes and the step -> batch mapping stay the same).
    """

    def __init__(self, task: Task, split: str):
        self.task, self.split = task, split
        self.skip = getattr(task.cfg, "on_bad_record", "error") == "skip"

    def __call__(self, index: int) -> dict:
        if index < 0:
            return self.task.pad_example()
        try:
            return self.task.example(self.split, index)
        except DataError as e:
            if not self.skip:
                raise
            with _SKIP_LOCK:  # reader threads share the task
                self.task.skipped_records = getattr(self.task, "skipped_records", 0) + 1
            warnings.warn(f"skipping an unreadable record (data.on_bad_record=skip): {e}",
                          RuntimeWarning, stacklevel=2)
            return self.task.pad_example()


def _plan(data_cfg, task, split, global_batch_size, process_index, process_count, shuffle,
          num_steps=FOREVER_STEPS) -> IndexPlan:
    split_id(split)
    size = task.split_size(split)
    if size < 1:
        raise ValueError(f"split {split!r} of task {task.name!r} is empty")
    if shuffle is None:
        shuffle = data_cfg.shuffle and split == "train"
    return IndexPlan(size, global_batch_size, process_index, process_count, data_cfg.seed,
                     shuffle, num_steps)


def dataset(data_cfg: DataConfig, split: str, global_batch_size: int, process_index: int = 0,
            process_count: int = 1, *, shuffle: Optional[bool] = None,
            task: Optional[Task] = None) -> grain.MapDataset:
    """MapDataset whose item ``ds[step]`` is this process's batch at that step.

    ``shuffle`` None: ``data_cfg.shuffle`` for train, no shuffle for valid/test.
    """
    task = task or make_task(data_cfg)
    plan = _plan(data_cfg, task, split, global_batch_size, process_index, process_count, shuffle)
    return (grain.MapDataset.source(plan).map(_Generate(task, split))
            .batch(plan.local, drop_remainder=True))


def batches(data_cfg: DataConfig, split: str, global_batch_size: int, start_step: int = 0,
            process_index: int = 0, process_count: int = 1, *,
            num_threads: Optional[int] = None, prefetch: Optional[int] = None,
            shuffle: Optional[bool] = None, task: Optional[Task] = None) -> Iterator[dict]:
    """Endless iterator of this process's batches from ``start_step`` on.

    The k-th batch it yields is ``dataset(...)[start_step + k]``. Reading runs in Grain's thread
    pool: ``num_threads`` threads (default ``data_cfg.num_threads``) keep up to ``prefetch``
    examples (default ``data_cfg.prefetch``) ready ahead of the consumer.
    """
    if not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step={start_step!r}: expected an integer >= 0")
    task = task or make_task(data_cfg)
    plan = _plan(data_cfg, task, split, global_batch_size, process_index, process_count, shuffle)
    examples = grain.MapDataset.source(plan).map(_Generate(task, split))
    examples = examples[start_step * plan.local:]
    read = grain.ReadOptions(
        num_threads=data_cfg.num_threads if num_threads is None else num_threads,
        prefetch_buffer_size=data_cfg.prefetch if prefetch is None else prefetch,
    )
    return iter(examples.to_iter_dataset(read).batch(plan.local, drop_remainder=True))


def num_eval_batches(data_cfg: DataConfig, global_batch_size: int, split: str = "valid",
                     task: Optional[Task] = None) -> int:
    """How many batches ``eval_batches`` yields."""
    task = task or make_task(data_cfg)
    n = min(data_cfg.num_eval_examples, task.split_size(split))
    return math.ceil(n / global_batch_size)


def eval_batches(data_cfg: DataConfig, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, *, split: str = "valid", task: Optional[Task] = None,
                 num_threads: Optional[int] = None, prefetch: Optional[int] = None
                 ) -> Iterator[dict]:
    """Finite iterator over the first ``num_eval_examples`` of ``split``, in fixed order.

    Every batch has the full local shape (L, T): the last one is padded with all-pad rows whose
    loss_mask is 0 (count real rows with ``num_scored_examples``). Text splits shorter than
    num_eval_examples are read whole.
    """
    task = task or make_task(data_cfg)
    n = min(data_cfg.num_eval_examples, task.split_size(split))
    if n < 1:
        raise ValueError(f"split {split!r} of task {task.name!r} is empty: nothing to evaluate")
    plan = IndexPlan(n, global_batch_size, process_index, process_count,
                     num_steps=math.ceil(n / global_batch_size), wrap=False)
    read = grain.ReadOptions(
        num_threads=data_cfg.num_threads if num_threads is None else num_threads,
        prefetch_buffer_size=data_cfg.prefetch if prefetch is None else prefetch,
    )
    examples = grain.MapDataset.source(plan).map(_Generate(task, split))
    return iter(examples.to_iter_dataset(read).batch(plan.local, drop_remainder=True))
