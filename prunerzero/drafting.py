"""Drafts for self-speculative decoding: a cheaper model that proposes tokens the dense model
verifies (prunerzero/generate.py runs it through transformers' assisted generation).

A draft is either
- a **saved pruned model directory** (any mode: `prunerzero.models.loading.load_model` loads it,
  reshaped or routed), or
- a **layer-skipping view** of the dense model (`layer_view`): a second `*ForCausalLM` whose
  embedding, norm, rotary table and head are the dense model's own module objects and whose
  decoder blocks are a chosen subset of the dense model's blocks — no weight is copied. Each
  block runs under the draft's own cache index (`_ViewBlock`), so the draft keeps a KV cache of
  its own, one layer per kept block, which transformers' assisted generation crops like any other.

Which blocks a view keeps is a spec string (`parse_spec`): `layers:0-9,20-29` (explicit),
`shortgpt:N` (drop the N blocks of least ShortGPT block influence, `pruning.influence`) or
`sweep:N` (drop N blocks greedily, each time the one whose removal keeps the draft's greedy
tokens closest to the dense model's on calibration text — a direct proxy of the acceptance rate).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunerzero.models.adapter import ModelAdapter, find_blocks
from prunerzero.models.corpora import tokenizer_fingerprint
from prunerzero.models.loading import load_model
from prunerzero.pruning.modes import MODES  # registering the modes also registers their reshaped loaders
from prunerzero.pruning.context import PruneContext
from prunerzero.pruning.influence import block_influence


class DraftError(ValueError):
    pass


class _ViewBlock(nn.Module):
    """One of the dense model's decoder blocks, run as block `index` of a draft: every submodule
    carrying a `layer_idx` (the attention: it names its KV-cache layer) sees the draft's index
    during the call and the dense one again afterwards, so the shared block writes the draft's
    cache layer, never the dense model's."""

    def __init__(self, block: nn.Module, index: int) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self._holders = [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, *args, **kwargs):
        saved = [m.layer_idx for m in self._holders]
        for m in self._holders:
            m.layer_idx = self.index
        try:
            return self.block(*args, **kwargs)
        finally:
            for m, i in zip(self._holders, saved):
                m.layer_idx = i


def _view_config(config, keep: Sequence[int]):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = [config.layer_types[i] for i in keep]  # sliding / full attention per kept block
    return cfg


def layer_view(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A `type(model)` that runs only the blocks `keep` (in order) of `model`, sharing every
    module with it: no parameter or buffer of its own (tested). Build it on the meta device, then
    put the dense model's modules in place of each child; whatever stays on meta is an error."""
    blocks_name, blocks = find_blocks(model)
    keep = [int(i) for i in keep]
    if not keep or sorted(set(keep)) != keep or not all(0 <= i < len(blocks) for i in keep):
        raise DraftError(f"a layer view keeps increasing block indices in 0..{len(blocks) - 1}, got {keep}")
    cfg = _view_config(model.config, keep)
    with torch.device("meta"):
        view = type(model)(cfg)
    path = blocks_name.split(".")
    dense_parent, view_parent = model, view
    for depth, attr in enumerate(path):
        for name, _ in list(view_parent.named_children()):
            if name != attr:
                setattr(view_parent, name, getattr(dense_parent, name))
        if depth < len(path) - 1:
            dense_parent, view_parent = getattr(dense_parent, attr), getattr(view_parent, attr)
    setattr(view_parent, path[-1], nn.ModuleList(_ViewBlock(blocks[i], j) for j, i in enumerate(keep)))
    left = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if left:
        raise DraftError(f"{type(model).__name__}: the layer view could not share {left[:3]} with the dense "
                         "model (a parameter or buffer outside its children): this family needs its own view")
    view.generation_config = copy.deepcopy(model.generation_config)
    view.draft_layers = tuple(keep)
    return view.eval()


class SubsetHead(nn.Module):
    """A draft's output layer over a subset of the vocabulary (the most frequent tokens): logits
    for those rows of the dense head, -inf elsewhere, at the full vocabulary's size (assisted
    generation compares shapes). The draft then proposes only frequent tokens — the dense model
    still verifies every one, so the output is unchanged — and reads `len(ids)` head rows a token
    instead of the whole vocabulary (on smollm2-135m the head is ~17% of a decoded token). Its
    rows are a copy (`len(ids)` × hidden): the one tensor a view does not share."""

    def __init__(self, head: nn.Linear, ids: torch.Tensor) -> None:
        super().__init__()
        self.vocab = head.weight.shape[0]
        self.register_buffer("ids", ids.to(head.weight.device).long(), persistent=False)
        self.register_buffer("rows", head.weight.detach()[self.ids].clone(), persistent=False)
        self.bias = None if head.bias is None else head.bias.detach()[self.ids].clone()

    @property
    def weight(self) -> torch.Tensor:  # what callers ask a head for: its vocabulary size
        return self.rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = nn.functional.linear(hidden, self.rows, self.bias)
        out = small.new_full((*small.shape[:-1], self.vocab), float("-inf"))
        return out.index_copy_(-1, self.ids, small)


def frequent_tokens(windows: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """The `n` most frequent token ids of `windows` (ties: the lower id), sorted."""
    counts = torch.bincount(windows.flatten(), minlength=vocab)[:vocab]
    return torch.argsort(-counts, stable=True)[:n].sort().values  # stable: equal counts keep id order


def with_subset_head(view: nn.Module, ids: torch.Tensor) -> nn.Module:
    """`view` with its output layer replaced by a SubsetHead over `ids`."""
    head = view.get_output_embeddings()
    view.set_output_embeddings(SubsetHead(head, ids))
    view.draft_vocab = len(ids)
    return view


def shares_weights(view: nn.Module, model: nn.Module) -> bool:
    """Every parameter and buffer of `view` is one of `model`'s own tensors."""
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return all(t.data_ptr() in own for t in [*view.parameters(), *view.buffers()])


# ------------------------------------------------------------------ choosing the blocks
def shortgpt_keep(model: nn.Module, windows: torch.Tensor, drop: int) -> list[int]:
    """The blocks kept when the `drop` blocks of least ShortGPT block influence (1 − cos of a
    block's input and output on `windows`) go: the skip mode's static ranking."""
    n = len(find_blocks(model)[1])
    _check_drop(drop, n)
    ctx = PruneContext(model=model, adapter=ModelAdapter(model), calibration=windows, stats=lambda needs: None)
    influence = block_influence(ctx)
    dropped = set(sorted(range(n), key=lambda i: (influence[i], i))[:drop])
    return [i for i in range(n) if i not in dropped]


@torch.no_grad()
def agreement(model: nn.Module, keep: Sequence[int], windows: torch.Tensor, dense_top: torch.Tensor | None = None) -> float:
    """Share of positions of `windows` where the view on `keep` predicts the dense model's greedy
    token: the acceptance rate greedy drafting would see on this text, teacher-forced."""
    dense_top = _greedy(model, windows) if dense_top is None else dense_top
    draft_top = _greedy(layer_view(model, keep), windows)
    return float((draft_top == dense_top).float().mean())


def sweep_keep(model: nn.Module, windows: torch.Tensor, drop: int, log=lambda msg: None) -> list[int]:
    """Drop `drop` blocks one at a time, each time the block whose removal leaves the highest
    greedy agreement with the dense model on `windows` (ties: the later block)."""
    n = len(find_blocks(model)[1])
    _check_drop(drop, n)
    dense_top = _greedy(model, windows)
    keep = list(range(n))
    for step in range(drop):
        scores = {i: agreement(model, [k for k in keep if k != i], windows, dense_top) for i in keep}
        best = max(keep, key=lambda i: (scores[i], i))
        keep.remove(best)
        log(f"sweep: dropped block {best} ({step + 1}/{drop}), agreement {scores[best]:.3f}")
    return keep


def _greedy(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(w[None].to(device), use_cache=False).logits.argmax(-1).cpu() for w in windows])


def _check_drop(drop: int, n: int) -> None:
    if not 0 < drop < n:
        raise DraftError(f"drop 1..{n - 1} of the model's {n} blocks, got {drop}")


# ------------------------------------------------------------------ specs
_SPEC = re.compile(r"^(layers|shortgpt|sweep):([0-9,\- ]+?)(?:\+head:([0-9]+))?$")


@dataclass(frozen=True)
class ViewSpec:
    """A layer view named by a string: `layers:0-9,20-29`, `shortgpt:N`, `sweep:N`, each
    optionally with `+head:V` (a SubsetHead over the V most frequent calibration tokens)."""
    kind: str
    value: str
    head: int = 0

    def keep(self, model: nn.Module, windows_fn=None, log=lambda msg: None) -> list[int]:
        """The blocks kept; `windows_fn()` gives calibration token windows (shortgpt, sweep)."""
        if self.kind == "layers":
            return parse_layers(self.value)
        if windows_fn is None:
            raise DraftError(f"{self.kind}:{self.value} needs calibration text to choose blocks by")
        drop = int(self.value)
        return (shortgpt_keep if self.kind == "shortgpt" else
                lambda m, w, d: sweep_keep(m, w, d, log))(model, windows_fn(), drop)


def parse_spec(spec: str) -> ViewSpec | None:
    """A ViewSpec for a view string, None for anything else (a model directory); a string that
    looks like a view but is malformed is an error naming the accepted forms."""
    m = _SPEC.match(spec.strip())
    if m is None:
        if spec.split(":")[0] in ("layers", "shortgpt", "sweep"):
            raise DraftError(f"draft {spec!r}: use layers:0-9,20-29, shortgpt:N or sweep:N (N blocks dropped), "
                             "optionally +head:V (a head over the V most frequent tokens)")
        return None
    kind, value, head = m.groups()
    if kind != "layers" and not value.strip().isdigit():
        raise DraftError(f"draft {spec!r}: {kind}:N takes the number of blocks to drop")
    return ViewSpec(kind, value.strip(), int(head or 0))


def parse_layers(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or hi and not hi.isdigit():
            raise DraftError(f"layers:{text}: {part!r} is not a block index or a range a-b")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def format_layers(keep: Sequence[int]) -> str:
    """`[0,1,2,5,6]` -> `0-2,5-6`: the spec that rebuilds a view."""
    parts, keep = [], list(keep)
    start = prev = None
    for i in keep + [None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = i
    return ",".join(parts)


@dataclass
class Draft:
    model: nn.Module
    kind: str  # "view" or the saved directory's marker kind ("dense" where none)
    description: str
    shared: bool  # a view sharing the dense model's weights


def check_compatible(dense, draft, dense_tokenizer=None, draft_tokenizer=None) -> None:
    """Assisted generation needs one vocabulary: the same vocab size, and the same tokenizer
    when both are known (`corpora.tokenizer_fingerprint`)."""
    def vocab(m):
        return m.get_output_embeddings().weight.shape[0]
    if vocab(dense) != vocab(draft):
        raise DraftError(f"the draft's vocabulary has {vocab(draft)} tokens, the dense model's {vocab(dense)}: "
                         "a draft must share the dense model's tokenizer")
    if dense_tokenizer is not None and draft_tokenizer is not None and (
            tokenizer_fingerprint(dense_tokenizer) != tokenizer_fingerprint(draft_tokenizer)):
        raise DraftError("the draft's tokenizer is not the dense model's: a draft must share it")


def saved_kind(path) -> str:
    """Which mode saved a model directory, by its recipe's marker file (`dense` for a plain one)."""
    return next((name for name, recipe in MODES.items()
                 if recipe.reshaped is not None and (Path(path) / recipe.reshaped[0]).is_file()), "dense")


def load_draft(spec: str, dense_lm, windows_fn=None, log=lambda msg: None) -> Draft:
    """The draft named by `spec` for the loaded dense model `dense_lm` (models.loading.LoadedModel):
    a view spec, or a model directory / zoo name loaded on the dense model's device and dtype."""
    view = parse_spec(spec)
    if view is not None:
        keep = view.keep(dense_lm.model, windows_fn, log)
        model = layer_view(dense_lm.model, keep)
        n = len(find_blocks(dense_lm.model)[1])
        text = f"layer view {spec} (keeps {len(keep)}/{n}: layers:{format_layers(keep)})"
        if view.head:
            if windows_fn is None:
                raise DraftError(f"{spec}: +head:V needs calibration text to count tokens in")
            vocab = dense_lm.model.get_output_embeddings().weight.shape[0]
            if not 0 < view.head <= vocab:
                raise DraftError(f"{spec}: +head:V takes 1..{vocab} tokens")
            with_subset_head(model, frequent_tokens(windows_fn(), view.head, vocab))
            text += f", head over the {view.head} most frequent tokens"
        return Draft(model, "view", text, True)
    lm = load_model(spec, device=str(dense_lm.device), dtype=str(dense_lm.dtype).removeprefix("torch."))
    check_compatible(dense_lm.model, lm.model, dense_lm.tokenizer, lm.tokenizer)
    kind = saved_kind(lm.path) if Path(lm.path).is_dir() else "dense"
    return Draft(lm.model, kind, f"model {spec} ({kind})", False)
