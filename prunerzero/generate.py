"""Self-speculative generation: a pruned model (or a layer view of the dense one) drafts, the dense
model verifies — greedy output identical to the dense model's, sampling from the dense
distribution.

What is transformers' and what is ours:
- transformers (`model.generate(..., assistant_model=draft)`, `generation/utils.py`
  `_assisted_decoding`, `candidate_generator.AssistedCandidateGenerator`): the draft-then-verify
  loop, one dense forward over all drafted tokens, the longest-agreeing-prefix rule for greedy, the
  rejection rule of speculative sampling (Leviathan et al., algorithm 1: accept a drafted token
  with probability min(1, p/q), else sample from norm(max(p − q, 0))), cropping both KV caches
  after a rejection, and the draft length adapting to acceptance (`num_assistant_tokens_schedule
  = "heuristic_transient"`: +2 after a fully accepted round, −1 otherwise; and the draft stops
  early where its own top probability falls under `assistant_confidence_threshold`).
- ours: drafts (prunerzero/drafting.py: a layer-skipping view sharing the dense model's weights, the
  block choice by ShortGPT influence or an agreement sweep, loading any saved pruned directory),
  the counts transformers does not report (drafted, accepted, verifier rounds: `Generation`),
  the timing and this job.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from prunerzero.drafting import load_draft
from prunerzero.models.corpora import bos_token, load_tokenized
from prunerzero.models.loading import load_model

SCHEDULES = ("heuristic_transient", "heuristic", "constant")


@dataclass
class Generation:
    """One generate call: the new tokens, its wall time and, with a draft, what the draft did."""
    tokens: list[int]
    seconds: float
    rounds: int = 0  # dense forwards (each verifies one draft, the first also reads the prompt)
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # of them, kept by the dense model
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the dense model kept (nan without a draft)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return len(self.tokens) / self.rounds if self.rounds else float("nan")


@contextmanager
def _rounds(dense, gen: Generation):
    """Count the dense model's forwards (one per verified draft, or per token without one)."""
    handle = dense.register_forward_pre_hook(lambda module, args: setattr(gen, "rounds", gen.rounds + 1))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _counted(dense, draft, gen: Generation):
    """Count the dense model's forwards and the draft's proposals around one generate call
    (an instance attribute shadows the draft's `generate` for the call only)."""
    original = draft.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        n = out.sequences.shape[1] - kwargs["input_ids"].shape[1]
        gen.drafted += n
        gen.draft_lengths.append(n)
        return out

    draft.generate = generate
    try:
        with _rounds(dense, gen):
            yield
    finally:
        del draft.generate


@torch.no_grad()
def generate(dense, input_ids: torch.Tensor, max_new_tokens: int, draft=None, *, sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             draft_tokens: int = 4, schedule: str = "heuristic_transient", confidence: float | None = 0.4,
             stop_at_eos: bool = True, lookup: int | None = None) -> Generation:
    """`max_new_tokens` after `input_ids` (1 × prompt) from the dense model, drafted by `draft`
    when given (transformers' assisted generation), else plain dense `generate`. Greedy unless
    `sample`. `draft_tokens` is the first draft length, adapted by `schedule`; `confidence` stops
    a draft early where the draft's top probability falls below it (None: never). `lookup` (no
    draft model): transformers' prompt lookup drafts up to that many tokens by matching the last
    n-gram earlier in the text — no model at all, a reference for what a free draft gives."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time (1 × tokens), got shape {tuple(input_ids.shape)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use {', '.join(SCHEDULES)}")
    if draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("draft_tokens and max_new_tokens must be at least 1")
    config = GenerationConfig.from_dict(dense.generation_config.to_dict())
    config.update(max_new_tokens=max_new_tokens, min_new_tokens=None, do_sample=sample, num_beams=1,
                  temperature=temperature if sample else None, top_k=top_k if sample else None,
                  top_p=top_p if sample else None, repetition_penalty=None)
    if not stop_at_eos:
        config.eos_token_id = None
    if config.pad_token_id is None:
        config.pad_token_id = dense.config.eos_token_id if isinstance(dense.config.eos_token_id, int) else 0
    device = next(dense.parameters()).device
    input_ids = input_ids.to(device)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "generation_config": config}
    gen = Generation(tokens=[], seconds=0.0)
    extra, counting = {}, nullcontext()
    if lookup is not None:
        extra, counting = {"prompt_lookup_num_tokens": lookup}, _rounds(dense, gen)  # drafted: not reported
    elif draft is not None:
        draft.generation_config.num_assistant_tokens = draft_tokens
        draft.generation_config.num_assistant_tokens_schedule = schedule
        draft.generation_config.assistant_confidence_threshold = confidence or 0.0
        extra, counting = {"assistant_model": draft}, _counted(dense, draft, gen)
    with counting:
        start = time.perf_counter()
        out = dense.generate(**kwargs, **extra)
        gen.seconds = time.perf_counter() - start
    gen.tokens = out[0, input_ids.shape[1]:].tolist()
    if not extra:
        gen.rounds = len(gen.tokens)
    else:  # every round adds one token of the dense model's own (the correction or the bonus)
        gen.accepted = max(0, len(gen.tokens) - gen.rounds)
    return gen


# ------------------------------------------------------------------ the user job
def calibration_windows(corpus: str, tokenizer, n: int = 4, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Train-split windows that choose a view's blocks (`shortgpt:N`, `sweep:N`)."""
    return load_tokenized(corpus, tokenizer).calibration(n, seq_len, seed, bos_token(tokenizer))


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    return ids


def generate_job(model: str, draft: str | None, prompt: str, max_new_tokens: int = 64, *, sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 draft_tokens: int = 4, schedule: str = "heuristic_transient", confidence: float | None = 0.4,
                 compare: bool = False, corpus: str = "austen", device: str = "auto", dtype: str = "auto",
                 log=print) -> dict:
    """Load the dense model and the draft, generate, and say how it went: text, tokens/s,
    acceptance; with `compare`, plain dense generation too (tokens/s and whether the text is
    identical, for greedy)."""
    dense = load_model(model, device=device, dtype=dtype)
    ids = encode_prompt(dense.tokenizer, prompt)
    the_draft = None
    if draft:
        windows = functools.cache(lambda: calibration_windows(corpus, dense.tokenizer))
        the_draft = load_draft(draft, dense, windows, log)
        log(f"draft: {the_draft.description}")
    options = dict(sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, draft_tokens=draft_tokens,
                   schedule=schedule, confidence=confidence)
    generate(dense.model, ids, 2, the_draft.model if the_draft else None, **options)  # warm-up, untimed
    torch.manual_seed(seed)
    gen = generate(dense.model, ids, max_new_tokens, the_draft.model if the_draft else None, **options)
    result = {"text": dense.tokenizer.decode(gen.tokens, skip_special_tokens=True), "tokens": len(gen.tokens),
              "seconds": gen.seconds, "tokens_per_s": gen.tokens_per_s, "rounds": gen.rounds,
              "drafted": gen.drafted, "accepted": gen.accepted, "acceptance": gen.acceptance,
              "draft": the_draft.description if the_draft else None}
    if compare and the_draft is not None:
        torch.manual_seed(seed)
        plain = generate(dense.model, ids, max_new_tokens, None, **options)
        result.update(dense_tokens_per_s=plain.tokens_per_s, speedup=gen.tokens_per_s / plain.tokens_per_s,
                      identical=plain.tokens == gen.tokens if not sample else None)
    return result
