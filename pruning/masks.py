"""Scores → masks, for every comparison group. The one place an N:M loop exists.

A mask is a bool tensor of the weight's shape, True where the weight is pruned (set to zero).
The lowest scores are pruned; ties are broken by position (the leftmost first, as a stable sort
would), so masks are deterministic on every backend.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .select_native import native_lowest

GROUPS = ("row", "layer")
SHORT_GROUP = 8  # N:M groups up to this width are ranked column by column (faster there than a selection)


class PatternError(ValueError):
    pass


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                group: str = "row", name: str = "") -> torch.Tensor:
    """Mask pruning the lowest-scored weights: `sparsity` of each output row (group "row", as
    Wanda) or of the whole matrix (group "layer"); with `nm = (N, M)` keep exactly N of every M
    consecutive weights along the input dimension (sparsity is then 1 - N/M)."""
    if nm is not None:
        return nm_mask(scores, *nm, name=name)
    if group == "row":
        return _lowest(scores, int(scores.shape[-1] * sparsity))
    if group == "layer":
        flat = _lowest(scores.reshape(1, -1), int(scores.numel() * sparsity))
        return flat.reshape(scores.shape)
    raise ValueError(f"unknown comparison group {group!r}: use one of {', '.join(GROUPS)}")


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of a 2-D tensor, True at the k lowest scores; among scores equal to the k-th
    lowest, the leftmost go first — exactly a stable sort's choice, at a partial selection's
    cost (no full sort). On CPU the native kernel (`native_lowest`); elsewhere, or without a
    C++ compiler, or for a row holding a NaN, `lowest_reference` — the same masks, bit for bit."""
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.device.type == "cpu" and k <= scores.shape[-1]:
        mask = native_lowest(scores, k)
        if mask is not None:
            return mask
    return lowest_reference(scores, k)


def lowest_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`_lowest` by a k-th lowest score per row (numpy's introselect on CPU, topk elsewhere),
    then the tie pass: the path of every device, and the CPU's where the native kernel is not."""
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kth = _kth_lowest(scores, k)
    if scores.device.type == "cpu":  # where a host check is free: skip the tie pass when no row needs it
        at_most = scores <= kth
        # every row has at least k scores <= its k-th lowest, so k per row is the total's k * rows
        if int(at_most.sum()) == k * scores.shape[0]:
            return at_most
    return tie_break(scores, kth, k)


def tie_break(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest per row given each row's k-th lowest score: all below it, then the leftmost
    of those equal to it."""
    below = scores < kth
    at = scores == kth
    room = k - below.sum(dim=-1, keepdim=True)  # how many of the tied scores are pruned
    return below | (at & (at.cumsum(dim=-1, dtype=torch.int32) <= room))


def _kth_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th lowest score, as a column. On CPU numpy's introselect finds it several
    times faster than torch.topk (measured: results/BENCHMARKS.md; splitting the rows across
    threads was slower, against torch's spinning OpenMP threads); elsewhere topk."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64, torch.float16):
        part = np.partition(scores.detach().numpy(), k - 1, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(part[:, k - 1 : k]))
    return topk_kth(scores, k)


def topk_kth(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th lowest score, as a column, by torch.topk (any device)."""
    return torch.topk(scores, k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """Keep the n highest of every m consecutive scores along the input dimension."""
    out_dim, in_dim = scores.shape
    if in_dim % m:
        raise PatternError(
            f"N:M pattern {n}:{m} does not divide the input width {in_dim}"
            f"{f' of {name}' if name else ''}: the width must be a multiple of {m}"
        )
    groups = scores.reshape(-1, m)
    if m > SHORT_GROUP:
        return _lowest(groups, m - n).reshape(out_dim, in_dim)
    return (_stable_ranks(groups) < m - n).reshape(out_dim, in_dim)


def _stable_ranks(groups: torch.Tensor) -> torch.Tensor:
    """Each score's place in a stable ascending sort of its (short) row: the scores below it
    plus the equal ones to its left. One elementwise pass per column — on 4-wide rows about
    4x faster than a per-row selection on CPU; past 8 wide the selection wins."""
    rank = torch.zeros(groups.shape, dtype=torch.int16, device=groups.device)
    for j in range(groups.shape[-1]):
        col = groups[:, j : j + 1]
        rank += groups > col
        rank[:, j + 1 :] += groups[:, j + 1 :] == col
    return rank


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set weight to +0.0 where mask is True, in place. The weight's bits are multiplied by the
    kept mask: on CPU about 10x faster than masked_fill_ (which takes a slow path), and exact
    (+0.0, where a float multiply would leave -0.0 at negative weights)."""
    weight.view(_SAME_WIDTH_INT[weight.element_size()]).mul_(mask.logical_not())


def check_pattern_fits(shapes: dict[str, torch.Size], nm: tuple[int, int] | None) -> None:
    """Fail before touching any weight if an N:M pattern does not divide some unit's width."""
    if nm is None:
        return
    bad = [f"{name} (width {shape[-1]})" for name, shape in shapes.items() if shape[-1] % nm[1]]
    if bad:
        raise PatternError(
            f"N:M pattern {nm[0]}:{nm[1]} does not divide the input width of {len(bad)} unit(s): "
            + ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        )


def packed(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8, eight weights to a byte (`np.packbits` order), where the mask lives."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))
    return pack_on_device(flat)


def pack_on_device(flat: torch.Tensor) -> torch.Tensor:
    """`np.packbits` (big-endian bit order) of a flat bool tensor, computed where it lives."""
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


class MaskDigest:
    """Fingerprint of a sequence of named masks: equal digests, the same weights pruned. Masks
    are bit-packed where they live and cross to the host once, when the digest is read (not
    one synchronisation per unit on the per-candidate path); the packed bits held until then
    are an eighth of one bool mask per unit."""

    def __init__(self) -> None:
        self._labels: list[bytes] = []
        self._packed: list[torch.Tensor] = []

    def add(self, name: str, mask: torch.Tensor) -> None:
        self._labels.append(f"{name}{tuple(mask.shape)}".encode())
        self._packed.append(packed(mask))

    def add_data(self, name: str, data: bytes) -> None:
        """Fold bytes that are not a mask (a plan) into the digest."""
        self._labels.append(f"{name}:plan".encode())
        self._packed.append(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                            torch.zeros(0, dtype=torch.uint8))

    def __len__(self) -> int:
        return len(self._labels)

    def hexdigest(self) -> str:
        """"" when no mask was added."""
        if not self._labels:
            return ""
        parts = list(self._packed)
        on_device = [i for i, p in enumerate(parts) if p.device.type != "cpu"]
        if on_device:  # one transfer for all of them
            moved = torch.cat([parts[i] for i in on_device]).cpu().split([parts[i].numel() for i in on_device])
            for i, p in zip(on_device, moved):
                parts[i] = p
        digest = hashlib.blake2b(digest_size=16)
        for label, part in zip(self._labels, parts):
            digest.update(label)
            digest.update(part.numpy())
        return digest.hexdigest()
