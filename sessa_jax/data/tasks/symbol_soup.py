"""SymbolSoup: 20-way classification of two stylised blocks hidden in uniform noise.

Follows /shared/TASKS.md (the Sessa paper's public generator), at token level:

    <bos> noise0 <sep1> block1 <sep2> noise1 <sep1> block2 <sep2> noise2 <sep> <label>

Two layouts (``data.symbol_soup.layout``) of the same drawn example:

* ``compact`` (default): exactly the 12 items above, one token per symbol and marker, no
  whitespace: M + 7 tokens for M symbols.
* ``paper``: the public generator's text, where every symbol, space and newline is a token.
  TASKS.md says whitespace counts but not where it falls; the choice made here: the symbols of
  one segment (a noise or stylised block) are separated by single spaces, and the 12 items
  (7 markers, 5 segments) are separated by newlines, so every marker and every segment sits on a
  line of its own and nothing trails the last line::

      <bos>\n n n n\n <sep1>\n b b\n <sep2>\n n\n <sep1>\n b b b\n <sep2>\n n n\n <sep>\n <label>

  (shown with a space after each newline for reading; there is none). Tokens: M symbols, M - 5
  spaces, 11 newlines, 7 markers = 2 M + 13, always odd, so M is drawn uniformly among the
  counts whose token length lies in [min_len, max_len]. ``render`` gives the text itself.

block1/block2 are a block of left style l (of 4) and one of right style r (of 5), in random
order; the class is k = 5*l + r. The example scores exactly one position, ``<label>``, whose
target is the token ``CLASS_k`` (classes are vocabulary tokens, so an LM head answers them).

Vocabulary (44 ids compact, 46 paper):
    0 <pad>, 1 <bos>, 2 <sep1>, 3 <sep2>, 4 <sep>, 5 <label>, 6 <eos>, 7 [MASK],
    8..23 the symbols a..p, 24..43 CLASS_0..CLASS_19; paper only: 44 ' ', 45 '\\n'.
<eos> and [MASK] are in the vocabulary (as in the public generator) but never emitted. The
whitespace ids come last so the compact ids (and trained compact models) are unchanged.

Style tables are drawn once per family with Python's ``random.Random(123)`` (left) and
``random.Random(456)`` (right), style by style in order, each shuffling a fresh copy of the 16
symbols. Examples use ``numpy.random.default_rng([seed, split, index, ...])``, so they differ
from the public generator's draws but follow the same distribution.
"""

from __future__ import annotations

import bisect
import dataclasses
import random

import numpy as np

from sessa_jax.data.config import DataConfig, soup_symbol_range
from sessa_jax.data.examples import make_example
from sessa_jax.data.tasks.base import Task, example_rng

SYMBOLS = "abcdefghijklmnop"
NUM_SYMBOLS = 16
SPECIALS = ("<pad>", "<bos>", "<sep1>", "<sep2>", "<sep>", "<label>", "<eos>", "[MASK]")
PAD, BOS, SEP1, SEP2, SEP, LABEL, EOS, MASK = range(8)
SYMBOL0 = len(SPECIALS)  # id of symbol 'a'
NUM_LEFT, NUM_RIGHT = 4, 5
NUM_CLASSES = NUM_LEFT * NUM_RIGHT
CLASS0 = SYMBOL0 + NUM_SYMBOLS  # id of CLASS_0
VOCAB_SIZE = CLASS0 + NUM_CLASSES  # compact layout
SPACE, NEWLINE = VOCAB_SIZE, VOCAB_SIZE + 1  # paper layout only
PAPER_VOCAB_SIZE = VOCAB_SIZE + 2
LEFT_SEED, RIGHT_SEED = 123, 456

# All contiguous runs of length 3, 4, 5 of a..p, shortest first, so "motifs of length <= n"
# is a prefix of this list.
MOTIFS = tuple(
    tuple(range(s, s + n)) for n in (3, 4, 5) for s in range(NUM_SYMBOLS - n + 1)
)
assert len(MOTIFS) == 39
_MOTIFS_UP_TO = {n: sum(1 for m in MOTIFS if len(m) <= n) for n in (3, 4, 5)}


@dataclasses.dataclass(frozen=True)
class Style:
    """One style's fixed tables. Symbols are 0..15 (a..p)."""

    order: tuple[int, ...]  # the shuffled symbols
    primaries: tuple[int, ...]
    secondaries: tuple[int, ...]
    unigram: tuple[float, ...]  # weight of each symbol 0..15
    bigrams: frozenset  # preferred (prev, next) pairs
    motif_weights: tuple[float, ...]  # weight of each of MOTIFS

    @staticmethod
    def from_order(order) -> "Style":
        order = tuple(int(x) for x in order)
        prim, sec = order[:4], order[4:8]
        uni = [1.0] * NUM_SYMBOLS
        for s in prim:
            uni[s] = 3.0
        for s in sec:
            uni[s] = 2.0
        big = set()
        for i in range(4):
            big.add((prim[i], prim[(i + 1) % 4]))
            big.add((prim[i], prim[i]))
            big.add((sec[i], sec[i]))
            big.add((prim[i], sec[i]))
            big.add((sec[i], prim[i]))
        motif_w = tuple(
            1.0 + 0.9 * sum(x in prim for x in m) + 0.5 * sum(x in sec for x in m) for m in MOTIFS
        )
        return Style(order, prim, sec, tuple(uni), frozenset(big), motif_w)


def make_styles(family_seed: int, count: int) -> tuple[Style, ...]:
    """Draw ``count`` styles from one family's RNG, in style order."""
    rng = random.Random(family_seed)
    styles = []
    for _ in range(count):
        syms = list(range(NUM_SYMBOLS))  # a fresh copy per style
        rng.shuffle(syms)
        styles.append(Style.from_order(syms))
    return tuple(styles)


LEFT_STYLES = make_styles(LEFT_SEED, NUM_LEFT)
RIGHT_STYLES = make_styles(RIGHT_SEED, NUM_RIGHT)


def _cumsum(weights) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


class _Sampler:
    """Cumulative weight tables of one style, for fast bisect sampling in a Python loop."""

    def __init__(self, style: Style, bigram_boost: float):
        self.uni = _cumsum(style.unigram)
        self.trans = [
            _cumsum(
                style.unigram[t] * (bigram_boost if (p, t) in style.bigrams else 1.0)
                for t in range(NUM_SYMBOLS)
            )
            for p in range(NUM_SYMBOLS)
        ]
        self.motifs = _cumsum(style.motif_weights)


def _pick(cum: list[float], u: float, n: int) -> int:
    """Index drawn by the weights whose prefix sums are cum[:n], from u ~ U[0, 1)."""
    return min(bisect.bisect_right(cum, u * cum[n - 1], 0, n), n - 1)


def stylised_block(sampler: _Sampler, length: int, rng: np.random.Generator,
                   motif_prob: float = 0.3, flip_prob: float = 0.03) -> np.ndarray:
    """A stylised block of ``length`` symbols (0..15), int64 (length,).

    Repeat until full: with prob ``motif_prob`` (if >= 3 symbols remain) a whole motif that fits,
    drawn by motif weight; else one Markov step (first symbol by unigram weight, later ones by
    unigram x boost for preferred bigrams). Then flip each symbol w.p. ``flip_prob`` to a
    different uniform symbol.
    """
    u = rng.random(2 * length + 2).tolist()  # <= 2 draws per loop turn, <= length turns
    out: list[int] = []
    k = 0
    while len(out) < length:
        remaining = length - len(out)
        coin, v = u[k], u[k + 1]
        k += 2
        if remaining >= 3 and coin < motif_prob:
            out.extend(MOTIFS[_pick(sampler.motifs, v, _MOTIFS_UP_TO[min(remaining, 5)])])
        else:
            cum = sampler.trans[out[-1]] if out else sampler.uni
            out.append(_pick(cum, v, NUM_SYMBOLS))
    block = np.asarray(out[:length], dtype=np.int64)
    flip = rng.random(length) < flip_prob
    block[flip] = (block[flip] + rng.integers(1, NUM_SYMBOLS, int(flip.sum()))) % NUM_SYMBOLS
    return block


@dataclasses.dataclass(frozen=True)
class SoupSample:
    """One example with its hidden structure (for tests and debugging)."""

    tokens: np.ndarray  # int32 (n,): <bos> .. <label>, token ids
    label: int  # class k = 5 * left + right
    left: int
    right: int
    left_first: bool
    left_block: np.ndarray  # symbols 0..15
    right_block: np.ndarray
    noise_sizes: tuple[int, int, int]


class SymbolSoupTask(Task):
    name = "symbol_soup"
    vocab_size = VOCAB_SIZE
    pad_id = PAD
    num_classes = NUM_CLASSES
    class_token0 = CLASS0  # CLASS_k has id class_token0 + k

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.sc = cfg.symbol_soup
        self.layout = self.sc.layout
        self.min_len, self.max_len = self.sc.lengths(cfg.seq_len)
        self.m_lo, self.m_hi = soup_symbol_range(self.layout, self.min_len, self.max_len)
        self.vocab_size = PAPER_VOCAB_SIZE if self.layout == "paper" else VOCAB_SIZE
        self.left_samplers = [_Sampler(s, self.sc.bigram_boost) for s in LEFT_STYLES]
        self.right_samplers = [_Sampler(s, self.sc.bigram_boost) for s in RIGHT_STYLES]

    def label_of(self, split: str, index: int) -> int:
        """Class of an example: classes are exactly balanced over each aligned run of 20."""
        perm = example_rng(self.seed, split, index // NUM_CLASSES, stream=1).permutation(
            NUM_CLASSES
        )
        return int(perm[index % NUM_CLASSES])

    def sample(self, split: str, index: int) -> SoupSample:
        label = self.label_of(split, index)
        left, right = divmod(label, NUM_RIGHT)
        rng = example_rng(self.seed, split, index)
        sc = self.sc
        # compact: the same draw as integers(min_len, max_len + 1) - 7 (same range)
        m = int(rng.integers(self.m_lo, self.m_hi + 1))  # symbols
        share = rng.uniform(sc.noise_min, sc.noise_max)
        n_noise = min(max(3, int(round(share * m))), m - 2)
        c1, c2 = np.sort(rng.choice(n_noise - 1, size=2, replace=False) + 1)
        noise_sizes = (int(c1), int(c2 - c1), int(n_noise - c2))
        n_style = m - n_noise
        n_first = int(rng.integers(1, n_style))  # length of block1
        left_first = bool(rng.random() < 0.5)
        n_left, n_right = (n_first, n_style - n_first) if left_first else (
            n_style - n_first, n_first)
        lb = stylised_block(self.left_samplers[left], n_left, rng, sc.motif_prob, sc.flip_prob)
        rb = stylised_block(self.right_samplers[right], n_right, rng, sc.motif_prob, sc.flip_prob)
        noise = [rng.integers(0, NUM_SYMBOLS, n) for n in noise_sizes]
        b1, b2 = (lb, rb) if left_first else (rb, lb)
        tokens = self.lay_out(noise[0], b1, noise[1], b2, noise[2])
        return SoupSample(tokens, label, left, right, left_first, lb, rb, noise_sizes)

    def lay_out(self, n0, b1, n1, b2, n2) -> np.ndarray:
        """The five segments (symbols 0..15) -> int32 token ids <bos> .. <label>."""
        s0 = SYMBOL0
        if self.layout == "compact":
            return np.concatenate([
                [BOS], n0 + s0, [SEP1], b1 + s0, [SEP2], n1 + s0,
                [SEP1], b2 + s0, [SEP2], n2 + s0, [SEP, LABEL],
            ]).astype(np.int32)
        items = [[BOS], _spaced(n0), [SEP1], _spaced(b1), [SEP2], _spaced(n1),
                 [SEP1], _spaced(b2), [SEP2], _spaced(n2), [SEP], [LABEL]]
        out = []
        for i, item in enumerate(items):
            if i:
                out.append(NEWLINE)
            out.extend(item)
        return np.asarray(out, np.int32)

    def render(self, ids) -> str:
        """Token ids -> the text they stand for: markers by name, symbols as letters, the paper
        layout's whitespace as itself, CLASS_k by name, <pad> dropped."""
        names = self.token_names()
        text = {SPACE: " ", NEWLINE: "\n"}
        return "".join(text.get(int(i), names[int(i)]) for i in np.asarray(ids).reshape(-1)
                       if int(i) != PAD)

    def example(self, split: str, index: int) -> dict:
        s = self.sample(split, index)
        seq = np.append(s.tokens, CLASS0 + s.label)
        return make_example(seq, [len(s.tokens) - 1], self.seq_len, PAD)

    def token_names(self) -> list[str]:
        names = list(SPECIALS) + list(SYMBOLS) + [f"CLASS_{k}" for k in range(NUM_CLASSES)]
        return names + (["<space>", "<newline>"] if self.layout == "paper" else [])


def _spaced(symbols: np.ndarray) -> list[int]:
    """Symbols 0..15 -> their token ids with a SPACE between consecutive ones."""
    out = []
    for i, x in enumerate(symbols.tolist()):
        if i:
            out.append(SPACE)
        out.append(SYMBOL0 + x)
    return out
