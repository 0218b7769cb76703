"""What a campaign can evolve: the problems the engine runs, by name (`[search] problem`).

- `metric` (default): GP over metric trees — the Pruner-Zero search; a campaign in any mode
  evolves the metric that mode applies (`[eval] mode`).
- `allocation`: GA over per-block sparsity levels for a fixed metric at a fixed total
  (EvoPress-style; evolve/genome.py).
- `joint`: the metric tree and the per-block allocation in one individual (OptiShear-style;
  evolve/joint_problem.py).
- `experts`: GA over each MoE layer's kept experts, then merge coefficients (EEP; mode
  "experts"; evolve/experts_problem.py).

To add a problem: a class with the engine's interface (`toolbox`, `seeds`, `prepare`,
`candidate`, `describe`, `size`, `fields`, `encode`, `decode`, `name`, `columns`; see
`problem.MetricProblem` and `genome.GenomeProblem`) and a builder here.
"""

from __future__ import annotations

from .genome import AllocationProblem
from .problem import MetricProblem

TOY_BLOCKS = 4  # the toy evaluator's "blocks" (row groups of its one layer)


def _metric(config):
    return MetricProblem(config.search, config.problem)


def _per_block(config) -> tuple[float, int]:
    """(target sparsity, decoder blocks) for a problem that sets a sparsity per block."""
    spec = config.eval_spec()
    target = spec.prune_target()
    if spec.mode != "unstructured" or getattr(target, "nm", None) is not None:
        raise ValueError(f"search.problem: {config.search.problem!r} sets a sparsity per block: it needs mode "
                         "'unstructured' with an unstructured pattern")
    return target.sparsity, block_count(spec.model)


def _allocation(config):
    return AllocationProblem(config.search, config.problem, *_per_block(config))


def _joint(config):
    from .joint_problem import JointProblem

    return JointProblem(config.search, config.problem, *_per_block(config))


def _experts(config):
    from .experts_problem import ExpertsProblem

    spec = config.eval_spec()
    if spec.mode != "experts":
        raise ValueError("search.problem: 'experts' evolves expert plans: it needs mode 'experts'")
    target = spec.prune_target()
    if target.allocation != "uniform":
        raise ValueError("search.problem: 'experts' keeps each layer's count; give target.experts or "
                         "target.per_layer, not allocation 'global'")
    opts = config.problem
    layers, experts = moe_shape(spec.model) if not (opts.get("layers") and opts.get("experts")) else (0, 0)
    layers, experts = opts.get("layers") or layers, opts.get("experts") or experts
    counts = target.counts or [target.experts] * layers
    if len(counts) != layers:
        raise ValueError(f"target.per_layer gives {len(counts)} counts; the model has {layers} MoE layers")
    return ExpertsProblem(config.search, opts, counts, experts)


def moe_shape(model: str) -> tuple[int, int]:
    """(MoE layers, routed experts per layer) from a model's config alone (no weights loaded)."""
    from prunerzero.models.loading import model_source, saved_config

    config = saved_config(model_source(model))  # a directory a mode saved keeps its real config apart
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        raise ValueError(f"search.problem 'experts': {model} has no routed experts in its config")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(f"{model} mixes dense and MoE layers: give problem.layers and problem.experts")
    return int(config.num_hidden_layers), int(experts)


def block_count(model: str) -> int:
    if model == "toy":
        return TOY_BLOCKS
    from prunerzero.models.loading import count_blocks

    return count_blocks(model)


PROBLEMS = {"metric": _metric, "allocation": _allocation, "joint": _joint, "experts": _experts}


def make_problem(config):
    """The problem a campaign configuration names, built for its model and target."""
    try:
        builder = PROBLEMS[config.search.problem]
    except KeyError:
        raise ValueError(f"search.problem: unknown problem {config.search.problem!r}; "
                         f"problems: {', '.join(PROBLEMS)}") from None
    return builder(config)
