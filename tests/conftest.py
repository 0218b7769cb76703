"""What the tests share: the one table of tiny random-init families (`tiny_model`, `build`) and the
one way to give a mode its context (`tiny_context`); the protocol every real-model file uses
(`REAL`); and how the suite shares the machine when pytest-xdist runs it on several workers
(pyproject.toml's addopts): each worker's share of the cores, the slowest files first."""

import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
    Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from prunerzero.core.protocol import Protocol

# The real-model files' protocol: one calibration draw (austen train, 2 x 128 tokens), so its W, G, X
# statistics are collected once per machine and read from the cache by every file after the first.
REAL = Protocol(seq_len=128, calib_windows=2, eval_windows=2)

# The slowest files first (measured with --durations=0 on 2 cores): xdist's loadfile hands a worker
# the next whole file when it frees up, so long files started last would leave the other idle.
SLOWEST_FIRST = ("test_bench.py", "test_real_structured.py", "test_real_model.py", "test_real_skip.py",
                 "test_pool.py", "test_untrusted_cluster.py", "test_real_modes.py", "test_real_attention.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order kept


def _share_the_cores() -> None:
    """Each xdist worker's torch (and the processes it starts) gets its share of the cores:
    two workers with every core each would fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()

TINY_VOCAB = 128


# The one table of tiny random-init families every unit test builds from: family -> (model class,
# config class, what the family needs beyond TINY_SHAPE). RoPE + GQA (llama, mistral); q/k/v biases
# (qwen2); q/k norms (qwen3); post-norms, q/k norms and a sliding window (gemma3); routed experts
# (mixtral, olmoe) and a shared expert with its gate (qwen2_moe).
N_EXPERTS = 4
TINY_FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "mistral": (MistralForCausalLM, MistralConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 8}),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {"head_dim": 8, "sliding_window": 4}),
    "mixtral": (MixtralForCausalLM, MixtralConfig, {"num_local_experts": N_EXPERTS, "num_experts_per_tok": 2}),
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig,
                  {"num_experts": N_EXPERTS, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                   "shared_expert_intermediate_size": 40}),
    "olmoe": (OlmoeForCausalLM, OlmoeConfig, {"num_experts": N_EXPERTS, "num_experts_per_tok": 2}),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
VOCAB = 64
TINY_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_model(family: str = "llama", seed: int | None = None, frozen: bool = True, **config):
    """A tiny random-init model of `family` in eval mode: TINY_SHAPE with `config` over it (e.g.
    num_hidden_layers=4); `seed` seeds torch first (else the caller's state draws it); `frozen`:
    no parameter requires a gradient, as models.loading.load_model returns models."""
    model_cls, config_cls, extra = TINY_FAMILIES[family]
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(config_cls(**(TINY_SHAPE | extra | config))).eval()
    return model.requires_grad_(False) if frozen else model


def build(family: str):
    """`family` seeded with 0, its parameters as transformers makes them."""
    return tiny_model(family, seed=0, frozen=False)


def tokens() -> torch.Tensor:
    """Two windows of 8 random ids in TINY_SHAPE's vocabulary."""
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def tiny_context(model, windows, stats: str | None = "WX", **kw):
    """A PruneContext on `model` and `windows` with one-shot statistics collected on them ("WX", or
    "WGX" with gradients; None: none), as the modes receive it. `kw`: PruneContext's other fields."""
    from prunerzero.models.adapter import ModelAdapter
    from prunerzero.primitives.stats import collect_stats
    from prunerzero.pruning.context import PruneContext

    model.requires_grad_(False)
    adapter = ModelAdapter(model)
    collected = collect_stats(model, adapter, windows, need_g="G" in stats) if stats else None
    return PruneContext(model, adapter, windows, lambda needs: collected, **kw)


@pytest.fixture
def tiny_llama():
    """A seeded LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128),
    in eval mode and frozen, as models.loading.load_model returns models."""
    return tiny_model("llama", seed=0, vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128)


@pytest.fixture
def tiny_windows():
    """Random token ids (4 windows x 16 tokens) for the tiny models' vocabulary."""
    return torch.randint(0, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def campaign_rows(run_dir):
    """A finished campaign's evaluations.csv and hall_of_fame.csv, as lists of dicts."""
    import csv

    def rows(name):
        with open(run_dir / name, newline="") as f:
            return list(csv.DictReader(f))
    return rows("evaluations.csv"), rows("hall_of_fame.csv")


@pytest.fixture
def measured_campaign():
    """Checks that a real campaign measured its candidates: every one of generation 0 evaluated
    (not a failure — whose fitness, 1e10, is finite too — not from a cache), the hall of fame's
    best is the lowest value measured, and `remeasure(formula)` — the evaluator run directly on
    that formula — gives the same number, which no broken evaluation could. Returns the best."""
    def check(run_dir, population, remeasure, dense):
        evaluations, hof = campaign_rows(run_dir)
        first = [r for r in evaluations if r["generation"] == "0"]
        assert len(first) == population and len({r["key"] for r in first}) == population
        assert all(r["status"] == "ok" and r["cached"] == "0" and float(r["seconds"]) > 0 for r in first), first
        best = float(hof[0]["fitness"])
        assert best == min(float(r["value"]) for r in evaluations if r["status"] == "ok")
        assert dense < best and remeasure(hof[0]["formula"]) == pytest.approx(best, rel=1e-6)
        return best
    return check
