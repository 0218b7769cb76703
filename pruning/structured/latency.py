"""A latency model measured on the machine it runs on (MDP's and ZipLM's latency table).

For every block: the latency of its attention at every head configuration, of its MLP at every
channel-group count, and the block's own remaining cost (norms, residual adds), for a prefill of
(batch, seq_len) tokens and for one decoded token with a KV cache of seq_len. Measured inside the
real model's forward (so RoPE, masks and caches are the real ones): each probe slices *every*
block to one configuration, and hooks time each sublayer; blocks with the same shape pool their
samples. What the blocks do not explain (embeddings, final norm, head) is the overhead.

Tables are cached per machine (CPU model or GPU name, torch version, threads, dtype) as JSON with
a checksum: a damaged file is named, set aside and measured again.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from prunerzero.core.integrity import CorruptCache, read_checked_json, set_aside, sha256, write_checked_json
from prunerzero.core.paths import cache_dir
from prunerzero.models.timing import decode_seconds, prefill_seconds, sync

from ..interventions import applied
from ..removal import remove_sublayer
from ..slicing import slice_attention, slice_mlp
from .selection import Options

PHASES = ("prefill", "decode")


@dataclass
class LatencyTable:
    """Seconds, per block: attention options [(kv heads, query heads per kv)], MLP options
    [channel groups kept]; option 0 of each is the removed sublayer."""

    attn_options: list[tuple[int, int]]
    mlp_options: list[int]
    width: int
    batch: int
    seq_len: int
    attn: dict  # phase -> (blocks, attention options)
    mlp: dict  # phase -> (blocks, MLP options)
    rest: dict  # phase -> (blocks,)
    overhead: dict  # phase -> seconds
    dense: dict  # phase -> measured dense seconds (no hooks)
    machine: str = ""
    seconds: float = 0.0  # what measuring it took

    def to_data(self) -> dict:
        return asdict(self)

    def options(self, phase: str, attn_importance=None, mlp_importance=None) -> Options:
        """The selection problem's options priced by this table (importance 0 where not given),
        made monotone: no option costs more than one that keeps everything it keeps and more."""
        attn, mlp = self.monotone_attention(phase), np.minimum.accumulate(np.asarray(self.mlp[phase])[:, ::-1], 1)[:, ::-1]
        return Options(np.zeros_like(attn) if attn_importance is None else attn_importance, attn,
                       np.zeros_like(mlp) if mlp_importance is None else mlp_importance, mlp,
                       np.asarray(self.rest[phase]), float(self.overhead[phase]))

    def monotone_attention(self, phase: str) -> np.ndarray:
        """A timing spike (anything else running for a moment) makes an option look dearer than a
        larger one; each option costs at most the cheapest option that dominates it."""
        raw = np.asarray(self.attn[phase])
        out = raw.copy()
        for i, (a, b) in enumerate(self.attn_options):
            if (a, b) != (0, 0):  # the removed option is priced by itself
                bigger = [j for j, (a2, b2) in enumerate(self.attn_options) if a2 >= a and b2 >= b]
                out[:, i] = raw[:, bigger].min(1)
        return out

    def dense_latency(self, phase: str) -> float:
        """The unpruned model's latency as the table predicts it (the budget's reference)."""
        opts = self.options(phase)
        return opts.latency(*opts.full, [False] * len(opts.rest))

    @classmethod
    def from_data(cls, data: dict) -> "LatencyTable":
        data = dict(data)
        data["attn_options"] = [tuple(o) for o in data["attn_options"]]
        table = cls(**data)
        table.check()
        return table

    def check(self, blocks: int | None = None) -> None:
        """Every phase prices every block's every option with a finite time >= 0 (a checksum
        proves only that the file is what was written: a table cut short and checksummed again
        would otherwise fail deep inside the selection). Errors name the field."""
        n = len(_phase(self.rest, "prefill", "rest")) if blocks is None else blocks
        shapes = {"attn": (n, len(self.attn_options)), "mlp": (n, len(self.mlp_options)), "rest": (n,),
                  "overhead": (), "dense": ()}
        for name, shape in shapes.items():
            for phase in PHASES:
                _check_times(_phase(getattr(self, name), phase, name), shape, f"{name}.{phase}")

    def check_fits(self, blocks: int, attn_options, mlp_options) -> None:
        """The table prices this model's blocks and options (its cache key names the shape)."""
        if list(self.attn_options) != list(attn_options) or list(self.mlp_options) != list(mlp_options):
            raise CorruptCache("its attention or MLP options are not this model's")
        self.check(blocks)


def _phase(table, phase: str, field: str):
    if not isinstance(table, dict) or phase not in table:
        raise CorruptCache(f"field {field!r} has no {phase} times")
    return table[phase]


def _check_times(values, shape: tuple, field: str) -> None:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise CorruptCache(f"field {field!r} is not numbers") from None
    if array.shape != shape or not np.isfinite(array).all() or (array < 0).any():
        raise CorruptCache(f"field {field!r} must be {shape or 'one'} finite times >= 0, got shape {array.shape}")


def attention_options(n_kv: int, group: int) -> list[tuple[int, int]]:
    """(0, 0) = removed, then every (kept KV heads, query heads kept per KV head)."""
    return [(0, 0)] + [(a, b) for a in range(1, n_kv + 1) for b in range(1, group + 1)]


def machine() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu}:{torch.get_num_threads()} threads"


def _uniform_plan(attn, opt: tuple[int, int]) -> list[list[int]] | None:
    a, b = opt
    if a == 0:
        return None
    g = attn.group_size
    return [list(range(kv * g, kv * g + b)) if kv < a else [] for kv in range(attn.n_kv_heads)]


class _Timer:
    """Forward hooks that time modules (wall clock, synchronised on a GPU) while recording."""

    def __init__(self, device: torch.device) -> None:
        self.on, self.device, self.times, self._t0, self._handles = False, device, {}, {}, []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def pre(mod, args, kwargs=None):
            if self.on:
                sync(self.device)
                self._t0[name] = time.perf_counter()

        def post(mod, args, out, kwargs=None):
            if self.on:
                sync(self.device)
                self.times.setdefault(name, []).append(time.perf_counter() - self._t0[name])
        self._handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                          module.register_forward_hook(post, with_kwargs=True)]

    @contextlib.contextmanager
    def recording(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _run(model, ids: torch.Tensor, phase: str, timer: _Timer, decode_tokens: int) -> float:
    """One pass with the sublayers timed; the whole pass's seconds (per token for decode)."""
    if phase == "prefill":
        return prefill_seconds(model, ids, timer.recording)
    return decode_seconds(model, ids, decode_tokens, timer.recording)


def _probe(model, structure, blocks, ids, a_opt, m_opt, width, repeats, decode_tokens):
    """Slice every block to one attention and one MLP option; time sublayers and blocks."""
    with applied() as edits:
        for b in structure.blocks:
            plan = _uniform_plan(b.attention, a_opt)
            if plan is None:
                remove_sublayer(edits, b.sublayers[0])
            else:
                slice_attention(edits, b.attention, plan)
            if m_opt == 0:
                remove_sublayer(edits, b.sublayers[1])
            else:
                slice_mlp(edits, b.mlp, range(m_opt * width))
        timer = _Timer(ids.device)
        for b in structure.blocks:
            timer.watch(f"attn{b.index}", getattr(b.sublayers[0].parent, b.sublayers[0].attr))
            timer.watch(f"mlp{b.index}", getattr(b.sublayers[1].parent, b.sublayers[1].attr))
            timer.watch(f"block{b.index}", blocks[b.index])
        out = {}
        try:
            for phase in PHASES:
                _run(model, ids, phase, timer, decode_tokens)  # warm-up
                runs = []
                for _ in range(repeats):
                    timer.times = {}
                    total = _run(model, ids, phase, timer, decode_tokens)
                    runs.append(({k: statistics.median(v) for k, v in timer.times.items()}, total))
                # interference from other work only ever adds time: the fastest repeat is the estimate
                out[phase] = ({k: min(r[0][k] for r in runs) for k in runs[0][0]}, min(r[1] for r in runs))
        finally:
            timer.close()
    return out


def _fastest(old: float, new: float) -> float:
    return new if old == 0.0 else min(old, new)


def _pool(values: list[float], signatures: list) -> list[float]:
    """The median over blocks of the same signature (same shapes and attention type)."""
    groups: dict = {}
    for v, s in zip(values, signatures):
        groups.setdefault(s, []).append(v)
    return [statistics.median(groups[s]) for s in signatures]


def table_options(structure, width: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The attention and MLP options a table for this structure prices."""
    _check_dense(structure)
    first = structure.blocks[0]
    return (attention_options(first.attention.n_kv_heads, first.attention.group_size),
            list(range(first.mlp.width // width + 1)))


def measure(model, adapter, width: int, batch: int = 1, seq_len: int = 256, repeats: int = 5,
            decode_tokens: int = 8, log=lambda m: None) -> LatencyTable:
    structure = adapter.structure
    a_opts, m_opts = table_options(structure, width)
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    n = len(structure.blocks)
    attn = {p: [[0.0] * len(a_opts) for _ in range(n)] for p in PHASES}
    mlp = {p: [[0.0] * len(m_opts) for _ in range(n)] for p in PHASES}
    rest, overhead = {p: [] for p in PHASES}, {p: 0.0 for p in PHASES}
    probes = max(len(a_opts), len(m_opts))
    t0 = time.perf_counter()
    _dense_seconds(model, ids, 2, decode_tokens)  # warm caches, allocator and clocks before any probe counts
    # every option at least once, the full model first and again last: each option keeps its fastest
    # time, so a probe slowed by anything else on the machine does not set the table
    order = list(range(probes)) + [0]
    for step, k in enumerate(order):
        ai = len(a_opts) - 1 - k * len(a_opts) // probes
        mi = len(m_opts) - 1 - k * len(m_opts) // probes
        got = _probe(model, structure, adapter.blocks, ids, a_opts[ai], m_opts[mi], width, repeats, decode_tokens)
        for phase, (times, total) in got.items():
            for b in range(n):
                attn[phase][b][ai] = _fastest(attn[phase][b][ai], times[f"attn{b}"])
                mlp[phase][b][mi] = _fastest(mlp[phase][b][mi], times[f"mlp{b}"])
            if k == 0:  # the dense model: the blocks' own cost and what lies outside the blocks
                here = [max(0.0, times[f"block{b}"] - times[f"attn{b}"] - times[f"mlp{b}"]) for b in range(n)]
                rest[phase] = [_fastest(a, b) for a, b in zip(rest[phase] or here, here)]
                outside = max(0.0, total - sum(times[f"block{b}"] for b in range(n)))
                overhead[phase] = _fastest(overhead[phase] or outside, outside)
        log(f"latency probe {step + 1}/{len(order)}: attention {a_opts[ai]}, MLP {m_opts[mi]} x {width} channels "
            f"({time.perf_counter() - t0:.0f}s)")
    signatures = [_signature(b) for b in structure.blocks]
    for phase in PHASES:
        attn[phase] = [list(col) for col in zip(*[_pool(list(c), signatures) for c in zip(*attn[phase])])]
        mlp[phase] = [list(col) for col in zip(*[_pool(list(c), signatures) for c in zip(*mlp[phase])])]
        rest[phase] = _pool(rest[phase], signatures)
    dense = _dense_seconds(model, ids, repeats, decode_tokens)
    return LatencyTable(a_opts, m_opts, width, batch, seq_len, attn, mlp, rest, overhead, dense, machine(),
                        time.perf_counter() - t0)


def _dense_seconds(model, ids, repeats, decode_tokens) -> dict:
    timer = _Timer(ids.device)
    _run(model, ids, "prefill", timer, decode_tokens)
    return {p: min(_run(model, ids, p, timer, decode_tokens) for _ in range(repeats)) for p in PHASES}


def _signature(block) -> tuple:
    a = block.attention
    return (a.n_heads, a.n_kv_heads, a.head_dim, block.mlp.width, getattr(block.module, "attention_type", ""))


def _check_dense(structure) -> None:
    for b in structure.blocks:
        if b.attention is None or b.mlp is None or len(b.sublayers) != 2:
            raise ValueError(f"structured pruning needs blocks of one attention and one dense MLP; block {b.index} "
                             "is not (an MoE block? use the experts mode)")
    shapes = {(b.attention.n_heads, b.attention.n_kv_heads, b.mlp.width) for b in structure.blocks}
    if len(shapes) > 1:
        raise ValueError(f"structured pruning needs blocks of one shape; this model has {sorted(shapes)}")


# ------------------------------------------------------------------ cache
def cache_key(model, width: int, batch: int, seq_len: int) -> str:
    config = model.config.to_dict() if hasattr(model, "config") else {}
    shape = {k: config.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")}
    dtype = str(next(model.parameters()).dtype)
    text = json.dumps([shape, width, batch, seq_len, dtype, machine(), torch.__version__], sort_keys=True)
    return sha256(text.encode())[:16]


def cached(model, width: int, batch: int = 1, seq_len: int = 256, log=print, directory=None,
           adapter=None) -> LatencyTable | None:
    """The cached table for this model shape on this machine, or None (a damaged one is set aside).
    With the model's adapter, a table that does not price its blocks and options is damaged too."""
    path = _path(model, width, batch, seq_len, directory)
    if not path.exists():
        return None
    expect = None if adapter is None else (len(adapter.structure.blocks), *table_options(adapter.structure, width))
    try:
        table = LatencyTable.from_data(read_checked_json(path))
        if expect is not None:
            table.check_fits(*expect)
        return table
    except (CorruptCache, ValueError, KeyError, TypeError) as e:
        set_aside(path, f"latency table: {e}", log=log, then="measuring again")
        return None


def _path(model, width, batch, seq_len, directory):
    return (directory or cache_dir("latency")) / f"{cache_key(model, width, batch, seq_len)}.json"


def load_or_measure(model, adapter, width: int, batch: int = 1, seq_len: int = 256, log=print,
                    directory=None, repeats: int = 5) -> LatencyTable:
    """The cached table for this model shape on this machine, else measured and cached."""
    table = cached(model, width, batch, seq_len, log, directory, adapter)
    if table is not None:
        return table
    path = _path(model, width, batch, seq_len, directory)
    log(f"measuring the latency table on {machine()} (batch {batch}, {seq_len} tokens; cached in {path})")
    table = measure(model, adapter, width, batch, seq_len, repeats, log=log)
    write_checked_json(path, table.to_data())
    return table
