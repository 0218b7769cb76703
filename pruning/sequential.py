"""Block-by-block calibration: each decoder block sees the outputs of the blocks before it
*as already pruned* — the schedule of the official Wanda (sequential) and SparseGPT code.

One dense forward records, for every block, the keyword arguments the model passes it
(position embeddings, masks — they differ per block in some families, e.g. Gemma3's sliding
layers), and the hidden states entering block 0. Then for each block in turn the caller
observes it (`process_block`: install hooks, run the block, prune it), and the block is run
once more to produce the next block's inputs.
"""

from __future__ import annotations

from typing import Callable

import torch


class _BlockInputs:
    """Hidden states entering block 0 per batch, and the kwargs of every block per batch."""

    def __init__(self, model, blocks, windows: torch.Tensor, batch_size: int) -> None:
        device = next(model.parameters()).device
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict]] = [[] for _ in blocks]
        handles = [b.register_forward_pre_hook(self._recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                for i in range(0, windows.shape[0], batch_size):
                    model(windows[i : i + batch_size].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, index: int):
        def hook(module, args, kwargs):
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                self.hidden.append(hidden.detach())
            kw.pop("past_key_values", None)
            kw["use_cache"] = False
            self.kwargs[index].append(kw)
        return hook


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_sequential(model, adapter, windows: torch.Tensor,
                   process_block: Callable[[int, Callable[[], None]], None],
                   batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> None:
    """For each block i: `process_block(i, run_block)` where `run_block()` runs block i over all
    calibration inputs (the caller wraps it in hooks and prunes afterwards); then the (pruned)
    block's outputs become block i+1's inputs."""
    blocks = adapter.blocks
    state = _BlockInputs(model, blocks, windows, batch_size)
    hidden = state.hidden
    for i, block in enumerate(blocks):
        def run_block(block=block, i=i, hidden=hidden):
            for h, kw in zip(hidden, state.kwargs[i]):
                block(h, **kw)

        process_block(i, run_block)
        hidden = [_block_output(block(h, **kw)) for h, kw in zip(hidden, state.kwargs[i])]
        if progress:
            progress(i + 1, len(blocks))
