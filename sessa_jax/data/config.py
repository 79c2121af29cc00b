"""Typed configuration of the data package.

:class:`DataConfig` picks a task and holds one nested, frozen dataclass per task with that task's
own knobs. Every dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming
the field by its full path (``data.mqar.num_pairs``) and what was expected, so a bad YAML value
fails at load time. Fields are plain typed values with defaults, so a generic loader can build
every level from plain dicts.

Whether a task fits in ``seq_len`` depends on both levels, so :class:`DataConfig` asks the chosen
task's config (``check_fits``) once its own fields are valid. The text task's files are only read
when the task is built (``sessa_jax.data.make_task``), not here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

TaskName = Literal["symbol_soup", "mqar", "selective_copy", "passkey", "text"]
TASKS = ("symbol_soup", "mqar", "selective_copy", "passkey", "text")
SPLITS = ("train", "valid", "test")

# SymbolSoup: <bos> n0 <sep1> b1 <sep2> n1 <sep1> b2 <sep2> n2 <sep> <label> = M symbols + 7.
SOUP_OVERHEAD = 7
SOUP_MIN_SYMBOLS = 5  # 3 noise blocks and 2 stylised blocks of at least 1 symbol each
# The 'paper' layout adds whitespace tokens (symbols/symbol_soup.py): M symbols, M - 5 spaces
# (between symbols of a segment), 11 newlines (between the 12 items) and the 7 markers.
SOUP_PAPER_OVERHEAD = 13  # tokens = 2 M + 13
SOUP_LAYOUTS = ("compact", "paper")


def soup_tokens(layout: str, m: int) -> int:
    """Token length (<bos> .. <label>) of a SymbolSoup example with m symbols."""
    return m + SOUP_OVERHEAD if layout == "compact" else 2 * m + SOUP_PAPER_OVERHEAD


def soup_symbol_range(layout: str, min_len: int, max_len: int) -> tuple[int, int]:
    """(m_lo, m_hi): the symbol counts whose token length lies in [min_len, max_len]."""
    if layout == "compact":
        return min_len - SOUP_OVERHEAD, max_len - SOUP_OVERHEAD
    # paper: lengths 2M + 13 are odd, so round the bounds inwards
    return -((SOUP_PAPER_OVERHEAD - min_len) // 2), (max_len - SOUP_PAPER_OVERHEAD) // 2


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(field: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{field}={value!r}: expected {what}")


def _check_opt_int(field: str, value, minimum: int) -> None:
    if value is not None:
        _check_int(field, value, minimum)


def _check_fraction(field: str, value, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = _is_num(value) and (value > 0 if lo_open else value >= 0) and (
        value < 1 if hi_open else value <= 1
    )
    if not ok:
        lo, hi = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{field}={value!r}: expected a number in {lo}0, 1{hi}")


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _resolve_len(prefix: str, min_len, max_len, seq_len: int, default_min: int):
    """(min_len, max_len) with None replaced by defaults, checked against seq_len."""
    lo = default_min if min_len is None else min_len
    hi = seq_len if max_len is None else max_len
    if hi > seq_len:
        raise ValueError(f"{prefix}.max_len={hi} exceeds seq_len={seq_len}")
    if lo > hi:
        raise ValueError(
            f"{prefix}.min_len={lo} is larger than {prefix}.max_len={hi} (seq_len={seq_len})"
        )
    return lo, hi


@dataclasses.dataclass(frozen=True)
class SymbolSoupConfig:
    """SymbolSoup (TASKS.md): 20-way classification of the two hidden stylised blocks.

    ``min_len``/``max_len`` bound the token length of an example from ``<bos>`` to ``<label>``
    inclusive; None derives them from seq_len (max_len = seq_len, min_len = 2/3 of it, like the
    public 400-600 default). Set them to train at one length and evaluate at another.

    ``layout``: ``"compact"`` (one token per symbol and marker, no whitespace: M + 7 tokens) or
    ``"paper"`` (the public generator's text, where every space and newline between symbols and
    markers is a token too: 2 M + 13 tokens, always odd); see ``data/tasks/symbol_soup.py``.
    """

    min_len: Optional[int] = None
    max_len: Optional[int] = None
    motif_prob: float = 0.3
    bigram_boost: float = 4.0
    flip_prob: float = 0.03
    noise_min: float = 0.3  # noise share of the M symbols is uniform in [noise_min, noise_max]
    noise_max: float = 0.6
    layout: Literal["compact", "paper"] = "compact"

    def __post_init__(self):
        p = "data.symbol_soup"
        _check_choice(f"{p}.layout", self.layout, SOUP_LAYOUTS)
        minimum = self.min_tokens
        _check_opt_int(f"{p}.min_len", self.min_len, minimum)
        _check_opt_int(f"{p}.max_len", self.max_len, minimum)
        _check_fraction(f"{p}.motif_prob", self.motif_prob)
        _check_fraction(f"{p}.flip_prob", self.flip_prob)
        if not _is_num(self.bigram_boost) or self.bigram_boost <= 0:
            raise ValueError(f"{p}.bigram_boost={self.bigram_boost!r}: expected a number > 0")
        _check_fraction(f"{p}.noise_min", self.noise_min)
        _check_fraction(f"{p}.noise_max", self.noise_max)
        if self.noise_min > self.noise_max:
            raise ValueError(
                f"{p}.noise_min={self.noise_min} is larger than {p}.noise_max={self.noise_max}"
            )

    @property
    def min_tokens(self) -> int:
        """Shortest possible example (5 symbols) in this layout."""
        return soup_tokens(self.layout, SOUP_MIN_SYMBOLS)

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(min_len, max_len) in tokens for this seq_len; raises ValueError if they don't fit."""
        minimum = self.min_tokens
        if seq_len < minimum:
            extra = "" if self.layout == "compact" else " and their spaces and newlines"
            raise ValueError(
                f"data.task='symbol_soup' does not fit seq_len={seq_len}: needs at least "
                f"{minimum} tokens (<bos>, 5 separators, <label> and >= 5 symbols{extra}; "
                f"data.symbol_soup.layout={self.layout!r})"
            )
        default_min = max(minimum, (2 * seq_len) // 3)
        if self.max_len is not None:
            default_min = min(default_min, self.max_len)
        lo, hi = _resolve_len("data.symbol_soup", self.min_len, self.max_len, seq_len,
                              default_min)
        m_lo, m_hi = soup_symbol_range(self.layout, lo, hi)
        if m_lo > m_hi:  # only the paper layout, whose lengths are all odd
            raise ValueError(
                f"data.symbol_soup.min_len={lo}, max_len={hi}: no example length fits; "
                f"layout='paper' lengths are 2*symbols + {SOUP_PAPER_OVERHEAD} (odd numbers)"
            )
        return lo, hi

    def check_fits(self, seq_len: int) -> None:
        self.lengths(seq_len)


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall (Zoology).

    ``num_pairs`` key-value pairs, then ``num_queries`` (None: all) distinct earlier keys each
    followed by its value; the position of each queried key is scored with its value as target.
    ``layout='spread'`` scatters the queries at random over the rest of the sequence (blank
    filler between them, as in Zoology); ``'packed'`` puts them right after the pairs.
    """

    num_pairs: int = 8
    num_queries: Optional[int] = None
    key_vocab: int = 64
    value_vocab: int = 64
    layout: Literal["spread", "packed"] = "spread"

    def __post_init__(self):
        p = "data.mqar"
        _check_int(f"{p}.num_pairs", self.num_pairs, 1)
        _check_opt_int(f"{p}.num_queries", self.num_queries, 1)
        _check_int(f"{p}.key_vocab", self.key_vocab, 1)
        _check_int(f"{p}.value_vocab", self.value_vocab, 1)
        if self.num_pairs > self.key_vocab:
            raise ValueError(
                f"{p}.num_pairs={self.num_pairs} exceeds {p}.key_vocab={self.key_vocab}: "
                "keys within an example are distinct"
            )
        if self.num_queries is not None and self.num_queries > self.num_pairs:
            raise ValueError(
                f"{p}.num_queries={self.num_queries} exceeds {p}.num_pairs={self.num_pairs}: "
                "each key is queried at most once"
            )
        _check_choice(f"{p}.layout", self.layout, ("spread", "packed"))

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    def min_seq_len(self) -> int:
        # <bos> + 2 per pair + 2 per query, less the last value (it is only ever a target).
        return 1 + 2 * self.num_pairs + 2 * self.queries - 1

    def check_fits(self, seq_len: int) -> None:
        need = self.min_seq_len()
        if seq_len < need:
            raise ValueError(
                f"data.mqar.num_pairs={self.num_pairs} (num_queries={self.queries}) does not fit "
                f"seq_len={seq_len}: needs at least {need} tokens"
            )


@dataclasses.dataclass(frozen=True)
class SelectiveCopyConfig:
    """Selective copying (Mamba paper, section 3.1).

    ``num_data_tokens`` tokens drawn from ``vocab`` data symbols sit at random positions of a
    region of ``context_len`` noise tokens (None: as long as seq_len allows); after a ``<copy>``
    marker the model must reproduce them in order.
    """

    num_data_tokens: int = 16
    vocab: int = 16
    context_len: Optional[int] = None

    def __post_init__(self):
        p = "data.selective_copy"
        _check_int(f"{p}.num_data_tokens", self.num_data_tokens, 1)
        _check_int(f"{p}.vocab", self.vocab, 1)
        _check_opt_int(f"{p}.context_len", self.context_len, 1)
        if self.context_len is not None and self.context_len < self.num_data_tokens:
            raise ValueError(
                f"{p}.context_len={self.context_len} is shorter than "
                f"{p}.num_data_tokens={self.num_data_tokens}"
            )

    def region_len(self, seq_len: int) -> int:
        """Length of the noise+data region for this seq_len."""
        # inputs = <bos> region <copy> d_1..d_{D-1}  (d_D is only a target)
        return seq_len - 1 - self.num_data_tokens if self.context_len is None else self.context_len

    def check_fits(self, seq_len: int) -> None:
        d = self.num_data_tokens
        need = 1 + max(self.context_len or d, d) + d
        if seq_len < need:
            raise ValueError(
                f"data.selective_copy.num_data_tokens={d} (context_len={self.context_len}) does "
                f"not fit seq_len={seq_len}: needs at least {need} tokens"
            )


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
    """Passkey retrieval: a ``digits``-digit number hidden in a repetitive filler.

    The key sits after a fraction ``depth`` of the filler, depth uniform in
    [min_depth, max_depth]; the example's length (tokens before padding) is uniform in
    [min_len, max_len] (None: seq_len). Set min = max for one cell of a depth x length sweep, or
    call ``PasskeyTask.example_at(split, index, depth=..., length=...)``.
    """

    digits: int = 5
    min_depth: float = 0.0
    max_depth: float = 1.0
    min_len: Optional[int] = None
    max_len: Optional[int] = None
    filler_vocab: int = 16

    def __post_init__(self):
        p = "data.passkey"
        _check_int(f"{p}.digits", self.digits, 1)
        _check_fraction(f"{p}.min_depth", self.min_depth)
        _check_fraction(f"{p}.max_depth", self.max_depth)
        if self.min_depth > self.max_depth:
            raise ValueError(
                f"{p}.min_depth={self.min_depth} is larger than {p}.max_depth={self.max_depth}"
            )
        _check_opt_int(f"{p}.min_len", self.min_len, 1)
        _check_opt_int(f"{p}.max_len", self.max_len, 1)
        _check_int(f"{p}.filler_vocab", self.filler_vocab, 1)

    def min_length(self) -> int:
        # <bos> filler(>=1) <key> d*k </key> <query> d_1..d_{k-1}
        return 2 * self.digits + 4

    def lengths(self, seq_len: int) -> tuple[int, int]:
        need = self.min_length()
        if seq_len < need:
            raise ValueError(
                f"data.passkey.digits={self.digits} does not fit seq_len={seq_len}: needs at "
                f"least {need} tokens"
            )
        default_min = seq_len if self.max_len is None else self.max_len
        lo, hi = _resolve_len("data.passkey", self.min_len, self.max_len, seq_len, default_min)
        if lo < need:
            raise ValueError(
                f"data.passkey.min_len={lo} is too short for digits={self.digits}: needs at "
                f"least {need} tokens"
            )
        return lo, hi

    def check_fits(self, seq_len: int) -> None:
        self.lengths(seq_len)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Language modelling on text, packed into rows with document boundaries at read time.

    ``paths``: exactly one directory written by ``sessa-prepare`` (document shards; the way for
    real corpora), or files and globs, local or cloud (read and tokenized in memory when the task
    is built; fine for small corpora). ``tokenizer``: "bytes", a Hugging Face ``tokenizer.json``
    (BPE/WordPiece/Unigram) or a SentencePiece ``.model``. ``input_format``: "auto" (by
    extension: .jsonl, .parquet, else text), "text", "jsonl" or "parquet"; ``field``: the JSONL
    field / Parquet column holding the text; ``document``: for text files, "file" (a file is one
    document) or "line" (each non-blank line is). ``on_bad_file``: "error" raises a DataError
    naming the file and problem; "skip" reports it and goes on. ``valid_fraction``: share of
    packed rows (the last ones) held out as the valid split.
    """

    paths: tuple[str, ...] = ()
    tokenizer: str = "bytes"
    input_format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    field: str = "text"
    document: Literal["file", "line"] = "file"
    on_bad_file: Literal["error", "skip"] = "error"
    valid_fraction: float = 0.01

    def __post_init__(self):
        p = "data.text"
        paths = self.paths
        if isinstance(paths, str):
            paths = (paths,)
        if not isinstance(paths, (list, tuple)) or not all(
            isinstance(x, str) and x for x in paths
        ):
            raise ValueError(f"{p}.paths={self.paths!r}: expected a list of non-empty strings")
        object.__setattr__(self, "paths", tuple(paths))  # YAML gives lists; keep it hashable
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"{p}.tokenizer={self.tokenizer!r}: expected 'bytes', a "
                             "tokenizer.json or a SentencePiece .model path")
        _check_choice(f"{p}.input_format", self.input_format, ("auto", "text", "jsonl", "parquet"))
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"{p}.field={self.field!r}: expected a non-empty field name")
        _check_choice(f"{p}.document", self.document, ("file", "line"))
        _check_choice(f"{p}.on_bad_file", self.on_bad_file, ("error", "skip"))
        _check_fraction(f"{p}.valid_fraction", self.valid_fraction, hi_open=True)

    def check_fits(self, seq_len: int) -> None:
        if not self.paths:
            raise ValueError("data.text.paths is empty: expected text files, globs or a "
                             "prepared directory")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train and evaluate on.

    ``seq_len`` is the model's input length T; every example has arrays of exactly this length.
    ``num_train_examples`` is the size of the train index space (synthetic tasks are generated on
    the fly, so it may be large); ``num_eval_examples`` is the size of the valid/test index
    spaces, and how many valid examples an eval pass reads. For ``text`` the split sizes are the
    packed row counts instead. ``shuffle``: visit each epoch of the train index space in a
    permuted order keyed by (seed, epoch). ``num_threads``/``prefetch`` tune Grain's reader.
    ``on_bad_record``: a record that cannot be read (a corrupted ArrayRecord shard) raises a
    DataError naming the file and record ("error"), or every example (packed text row) that
    needs it is replaced by an all-pad, unscored one, warned about and counted in the run's
    summary as ``skipped_records`` ("skip"); it may change on resume.
    """

    task: TaskName = "symbol_soup"
    seq_len: int = 512
    seed: int = 0
    num_train_examples: int = 1_000_000
    num_eval_examples: int = 2_000
    shuffle: bool = True
    num_threads: int = 2
    prefetch: int = 32  # examples buffered by the reader
    on_bad_record: Literal["error", "skip"] = "error"
    symbol_soup: SymbolSoupConfig = dataclasses.field(default_factory=SymbolSoupConfig)
    mqar: MQARConfig = dataclasses.field(default_factory=MQARConfig)
    selective_copy: SelectiveCopyConfig = dataclasses.field(default_factory=SelectiveCopyConfig)
    passkey: PasskeyConfig = dataclasses.field(default_factory=PasskeyConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)

    def __post_init__(self):
        _check_choice("data.task", self.task, TASKS)
        _check_int("data.seq_len", self.seq_len, 2)
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r}: expected an integer >= 0")
        _check_int("data.num_train_examples", self.num_train_examples, 1)
        _check_int("data.num_eval_examples", self.num_eval_examples, 1)
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"data.shuffle={self.shuffle!r}: expected true or false")
        _check_int("data.num_threads", self.num_threads, 0)
        _check_int("data.prefetch", self.prefetch, 0)
        _check_choice("data.on_bad_record", self.on_bad_record, ("error", "skip"))
        for name, cls in (
            ("symbol_soup", SymbolSoupConfig), ("mqar", MQARConfig),
            ("selective_copy", SelectiveCopyConfig), ("passkey", PasskeyConfig),
            ("text", TextConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"data.{name}={getattr(self, name)!r}: expected a {cls.__name__} "
                    "(build it from its dict first)"
                )
        self.task_config.check_fits(self.seq_len)

    @property
    def task_config(self):
        """The nested config of the chosen task."""
        return getattr(self, self.task)
