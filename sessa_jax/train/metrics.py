"""What a run reports: FLOPs and MFU, the progress line, metrics.jsonl and TensorBoard.

``metrics.jsonl`` holds one JSON object per logged step: ``step``, ``loss``, ``accuracy``,
``grad_norm``, ``learning_rate``, ``tokens_per_sec``, ``mfu`` (null on CPU), ``skipped``, ``time``
(seconds since start) and, on eval steps, ``eval/<name>`` entries; with
``run.stability_stats``, also ``stability/layer<i>/<name>`` (sessa_jax/train/stability.py).
Non-finite numbers are written as null (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Optional

from sessa_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip. Matched against jax's device_kind, most specific first.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Peak bf16 FLOP/s of one device of this kind; None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    if "cpu" in kind:
        return None
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def param_count(model_cfg: ModelConfig) -> int:
    """Parameter count of the model, from shapes only (nothing allocated)."""
    import jax
    from flax import nnx
    from sessa_jax.models.lm import DecoderLM

    model = nnx.eval_shape(lambda: DecoderLM(model_cfg, rngs=nnx.Rngs(0)))
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(model_cfg: ModelConfig, seq_len: int, n_params: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward) at length ``seq_len``.

    6 N for the matmuls (N = parameters, less the embedding table when it is not tied to the
    LM head, since a lookup costs nothing) plus the sequence-mixing terms per layer, PaLM-style
    (no causal halving): causal attention 12 T D; Sessa twice that (forward branch plus the
    full-width feedback attention and its solve); a Mamba-style scan about 18 d_inner d_state;
    Mamba-2's chunked SSD (chunk Q = min(ssd_chunk_size, T), E = d_inner, G N = B/C width)
    3 x [2 Q (G N + E) (C B^T and its masked product with x, full Q x Q blocks) + 4 E N
    (chunk states x^T B and the inter-chunk C h)].
    """
    n = param_count(model_cfg) if n_params is None else n_params
    if not model_cfg.tie_embeddings:
        n -= model_cfg.vocab_size * model_cfg.d_model
    L, D, T = model_cfg.n_layers, model_cfg.d_model, seq_len
    if model_cfg.family == "transformer":
        mix = 12 * T * D
    elif model_cfg.family == "sessa":
        mix = 24 * T * D
    elif model_cfg.family == "mamba2":
        Q = min(model_cfg.ssd_chunk_size, T)
        E, GN = model_cfg.expand * D, model_cfg.ssd_ngroups * model_cfg.d_state
        mix = 3 * (2 * Q * (GN + E) + 4 * E * model_cfg.d_state)
    else:
        mix = 18 * model_cfg.expand * D * model_cfg.d_state
    return float(6 * n + L * mix)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _clean(v):
    """JSON-safe scalar: numpy/jax scalars to Python, non-finite floats to None."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """metrics.jsonl + TensorBoard event files in the run directory (process 0 only).

    ``run_dir`` may be a URI (gs://...). A local metrics.jsonl is appended to line by line; an
    object store cannot append, so there the file is rewritten whole, at most every
    ``remote_flush_sec`` seconds, on :meth:`flush` (the loop calls it when it saves a
    checkpoint) and on :meth:`close`.
    """

    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True,
                 remote_flush_sec: float = 60.0):
        from sessa_jax.paths import is_local, user_path

        self.enabled = enabled
        self.run_dir = user_path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.local = is_local(self.path)
        self.remote_flush_sec = remote_flush_sec
        self._lines: Optional[list[str]] = None  # remote: the whole file, in memory
        self._dirty, self._flushed_at = False, time.perf_counter()
        self.tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # writes gs:// and s3:// itself
                self.tb = SummaryWriter(logdir=str(self.run_dir / "tb"))
            except Exception as e:  # TensorBoard is a nicety; never fail a run over it
                print(f"warning: TensorBoard disabled ({e})", file=sys.stderr)

    def _read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return self.path.read_text(encoding="utf-8").splitlines(keepends=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (a resumed run rewrites what followed its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self._read_lines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        from sessa_jax.paths import write_text
        write_text(self.path, "".join(keep))
        if not self.local:
            self._lines = keep

    def history(self) -> list[dict]:
        """The records already in metrics.jsonl (empty when none, or not process 0)."""
        if not self.enabled:
            return []
        lines = self._lines if self._lines is not None else self._read_lines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(rec) + "\n"
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
        else:
            if self._lines is None:
                self._lines = self._read_lines()
            self._lines.append(line)
            self._dirty = True
            if time.perf_counter() - self._flushed_at >= self.remote_flush_sec:
                self.flush()
        if self.tb is not None:
            step = rec["step"]
            for k, v in rec.items():
                if k in ("step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                tag = k if "/" in k else f"train/{k}"
                self.tb.add_scalar(tag, v, step)
            self.tb.flush()

    def flush(self) -> None:
        """Write what is pending (only an object store has anything pending)."""
        if self.enabled and self._dirty and self._lines is not None:
            self.path.write_text("".join(self._lines), encoding="utf-8")
            self._dirty, self._flushed_at = False, time.perf_counter()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Tokens/s, MFU and ETA over the window since the previous report."""

    def __init__(self, tokens_per_step: int, flops_per_token: float,
                 peak_total: Optional[float], total_steps: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_total = peak_total
        self.total_steps = total_steps
        self.t0: Optional[float] = None
        self.s0 = 0
        self.sec_per_step: Optional[float] = None

    def start(self, step: int) -> None:
        """Begin timing after ``step`` (the first, compiling step is left out)."""
        self.t0, self.s0 = time.perf_counter(), step

    def report(self, step: int) -> dict:
        out = {"tokens_per_sec": None, "mfu": None, "eta_sec": None}
        if self.t0 is None or step <= self.s0:
            return out
        now = time.perf_counter()
        dt = now - self.t0
        sps = dt / (step - self.s0)
        prev = self.sec_per_step
        self.sec_per_step = sps if prev is None else 0.7 * prev + 0.3 * sps  # smooth the ETA
        tps = self.tokens_per_step / sps
        out["tokens_per_sec"] = tps
        if self.peak_total:
            out["mfu"] = tps * self.flops_per_token / self.peak_total
        out["eta_sec"] = self.sec_per_step * (self.total_steps - step)
        self.t0, self.s0 = now, step
        return out


def progress_line(step: int, total: int, m: dict) -> str:
    """'step 120/300 | loss 1.234 | acc 0.456 | 12.3k tok/s | MFU n/a | ETA 1m05s'."""
    def num(v, f):
        return "nan" if v is None else format(v, f)

    parts = [f"step {step}/{total}", f"loss {num(m.get('loss'), '.4f')}",
             f"acc {num(m.get('accuracy'), '.3f')}", f"lr {num(m.get('learning_rate'), '.2e')}"]
    tps = m.get("tokens_per_sec")
    parts.append(f"{fmt_count(tps)} tok/s" if tps else "-- tok/s")
    mfu = m.get("mfu")
    parts.append(f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a")
    eta = m.get("eta_sec")
    parts.append(f"ETA {fmt_duration(eta)}" if eta is not None else "ETA --")
    if m.get("skipped_total"):
        parts.append(f"skipped {m['skipped_total']}")
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    if m.get("eval/bits_per_byte") is not None:
        parts.append(f"eval bpb {m['eval/bits_per_byte']:.3f}")
    return " | ".join(parts)


# -- goodput: where a session's wall time went ------------------------------------------------

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Goodput:
    """Wall time of a training session split into what was lost and what trained.

    ``compile``: JAX's own tracing, lowering and XLA compile (or cache-load) durations, from
    ``jax.monitoring`` (every jit of the session: train, eval, checksum steps). The other
    buckets are timed around the loop's calls with the compile time inside them taken out, so
    no second counts twice: ``setup`` (config, mesh, model, restore), ``data`` (blocked on the
    input pipeline), ``checkpoint`` (saving and waiting for saves), ``eval``, ``profile``.
    ``step`` is the rest: dispatching and running training steps. They add up to the wall time.
    Also counts persistent compilation cache hits and misses (writes).

    ``data`` is host time: with asynchronous dispatch the device is usually still running the
    previous step while the host fetches the next batch. ``data_stall`` (:meth:`stall`) is the
    part of it that can have kept the device waiting: fetches that ended with nothing left
    queued on the device (an upper bound on the device's wait for input).
    """

    BUCKETS = ("setup", "data", "checkpoint", "eval", "profile")

    def __init__(self, t0: Optional[float] = None):
        import jax.monitoring

        self.t0 = time.perf_counter() if t0 is None else t0
        self._spans: list[tuple[float, float]] = []  # (start, end) of each compile event
        self.cache_hits = self.cache_writes = 0
        self.sec = {b: 0.0 for b in self.BUCKETS}
        self.first: dict[str, float] = {}  # each bucket's first span (the pipeline's start-up)
        self.data_stall = 0.0
        self._mon = jax.monitoring
        self._mon.register_event_duration_secs_listener(self._on_duration)
        self._mon.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        if event in _COMPILE_EVENTS:  # reported when it ends; a nested jit's trace lies
            end = time.perf_counter()  # inside its caller's: spans are merged, not summed
            self._spans.append((end - float(duration), end))

    def compile_between(self, t0: float = float("-inf"), t1: float = float("inf")) -> float:
        """Seconds inside [t0, t1] spent tracing, lowering or compiling (spans merged)."""
        total, cur = 0.0, None
        for a, b in sorted((max(a, t0), min(b, t1)) for a, b in self._spans):
            if b <= a:
                continue
            if cur is None or a > cur[1]:
                if cur is not None:
                    total += cur[1] - cur[0]
                cur = [a, b]
            else:
                cur[1] = max(cur[1], b)
        if cur is not None:
            total += cur[1] - cur[0]
        return total

    @property
    def compile(self) -> float:
        return self.compile_between(self.t0)

    def _on_event(self, event: str, **kw) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.cache_writes += 1

    def close(self) -> None:
        for fn, unreg in ((self._on_duration, self._mon.unregister_event_duration_listener),
                          (self._on_event, self._mon.unregister_event_listener)):
            try:
                unreg(fn)
            except (AssertionError, ValueError):
                pass

    class _Timer:
        def __init__(self, owner, bucket):
            self.owner, self.bucket = owner, bucket

        def __enter__(self):
            self.t = time.perf_counter()
            return self

        def __exit__(self, *exc):
            self.owner.add(self.bucket, self.t, time.perf_counter())

    def add(self, bucket: str, t0: float, t1: float) -> float:
        """Add the wall time [t0, t1] (less compiles in it) to ``bucket``; returns it."""
        dt = max(0.0, t1 - t0 - self.compile_between(t0, t1))
        self.first.setdefault(bucket, dt)
        self.sec[bucket] += dt
        return dt

    def stall(self, dt: float, last_output) -> None:
        """A fetch of ``dt`` seconds just ended; ``last_output`` is an array the newest dispatched
        step computes (None before the first step). If that step is already done, the device
        has had nothing to run for up to ``dt``: count it as a stall."""
        ready = getattr(last_output, "is_ready", None)
        if last_output is None or ready is None or ready():
            self.data_stall += dt

    def timing(self, bucket: str) -> "Goodput._Timer":
        """``with goodput.timing('data'): ...`` adds the block's time (less compiles) there."""
        return self._Timer(self, bucket)

    def report(self, tokens: int, flops_per_token: float, peak_total: Optional[float]) -> dict:
        """The summary's ``goodput`` entry; ``tokens``: tokens trained this session."""
        total = time.perf_counter() - self.t0
        comp = self.compile
        lost = comp + sum(self.sec.values())
        step = max(0.0, total - lost)
        out = {"total_sec": total, "compile_sec": comp,
               **{f"{b}_sec": v for b, v in self.sec.items()}, "step_sec": step,
               # the first batch's wait (workers starting, first reads), inside data_sec: a
               # per-step input stall is data_sec - data_first_sec
               "data_first_sec": self.first.get("data", 0.0),
               # fetches that left the device idle (see the class docstring), first included
               "data_stall_sec": self.data_stall,
               "goodput": step / total if total > 0 else None,
               "tokens_per_sec": tokens / total if total > 0 else None,
               "step_tokens_per_sec": tokens / step if step > 0 else None,
               "mfu": None, "step_mfu": None,
               "compilation_cache": {"hits": self.cache_hits, "writes": self.cache_writes}}
        if peak_total:
            flops = tokens * flops_per_token
            out["mfu"] = flops / (total * peak_total) if total > 0 else None
            out["step_mfu"] = flops / (step * peak_total) if step > 0 else None
        return out


def goodput_line(g: dict) -> str:
    """'time: 1m05s = compile 12s (18%) + data 1s + checkpoint 3s + ... | MFU 41.2% (steps 45.0%)'."""
    total = g["total_sec"] or 1e-9
    parts = []
    for name in ("step", "compile", "setup", "data", "checkpoint", "eval", "profile"):
        v = g.get(f"{name}_sec") or 0.0
        if name in ("step", "compile", "data", "checkpoint") or v >= 0.05:
            label = "training steps" if name == "step" else name
            parts.append(f"{label} {v:.1f}s ({v / total:.0%})")
            if name == "data" and g.get("data_stall_sec") is not None:
                parts[-1] += f" [device idle on data {g['data_stall_sec']:.1f}s]"
    mfu = ("MFU n/a (unknown device peak)" if g.get("mfu") is None else
           f"MFU {g['mfu']:.1%} over the session, {g['step_mfu']:.1%} over training steps")
    cache = g.get("compilation_cache") or {}
    extra = (f" | compilation cache: {cache['hits']} hits, {cache['writes']} writes"
             if cache.get("hits") or cache.get("writes") else "")
    return f"time {fmt_duration(g['total_sec'])} = " + " + ".join(parts) + f" | {mfu}{extra}"
