"""What a campaign can evolve: the problems the engine runs, by name (`[search] problem`).

- `metric` (default): GP over metric trees — the Pruner-Zero search; a campaign in any mode
  evolves the metric that mode applies (`[eval] mode`).
- `allocation`: GA over per-block sparsity levels for a fixed metric at a fixed total
  (EvoPress-style; evolve/genome.py).
- `joint`: the metric tree and the per-block allocation in one individual (OptiShear-style;
  evolve/joint_problem.py).
- `experts`: GA over each MoE layer's kept experts, then merge coefficients (EEP; mode
  "experts"; evolve/experts_problem.py).
- `skip_plan`: GA over the skip mode's static removal sets, seeded with the hand-made rankings'
  choices (mode "skip"; evolve/skip_problem.py).

Which problems a mode accepts is its recipe's `problems` (pruning/recipe.py), checked with the
campaign config (`check_problem`).

To add a problem: a class with the engine's interface (`toolbox`, `seeds`, `prepare`,
`candidate`, `describe`, `size`, `fields`, `encode`, `decode`, `name`, `columns`; see
`problem.MetricProblem` and `genome.GenomeProblem`) and a builder here.
"""

from __future__ import annotations

import dataclasses

from prunerzero.fitness.evaluator import Evaluator
from prunerzero.models.loading import count_blocks, model_source, saved_config
from prunerzero.models.structure import expert_count_attrs
from prunerzero.pruning.candidates import Method
from prunerzero.pruning.modes import get_mode
from prunerzero.pruning.skip.mode import ranked, removed_count

from .experts_problem import ExpertsProblem
from .genome import AllocationProblem
from .joint_problem import JointProblem
from .problem import MetricProblem
from .skip_problem import SkipPlanProblem

TOY_BLOCKS = 4  # the toy evaluator's "blocks" (row groups of its one layer)


def _metric(config):
    return MetricProblem(config.search, config.problem)


def _per_block(config) -> tuple[float, int]:
    """(target sparsity, decoder blocks) for a problem that sets a sparsity per block."""
    spec = config.eval_spec()
    target = spec.prune_target()
    if getattr(target, "nm", None) is not None or not hasattr(target, "sparsity"):
        raise ValueError(f"search.problem: {config.search.problem!r} sets a sparsity per block: it needs a target "
                         "with a sparsity and an unstructured pattern")
    return target.sparsity, block_count(spec.model)


def _allocation(config):
    return AllocationProblem(config.search, config.problem, *_per_block(config))


def _joint(config):

    return JointProblem(config.search, config.problem, *_per_block(config))


def _experts(config):
    spec = config.eval_spec()
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


def _skip_plan(config):
    """The removal-set GA; the driver loads the model once for the seeds' and order's rankings (on
    the calibration `problem.seq_len` x `problem.calib_windows` names: the full protocol's, so the
    seeds are the hand-made baselines' own plans; removal losses are cached on disk)."""
    opts = SkipPlanProblem.parse(config.problem)
    spec = config.eval_spec()
    target = spec.prune_target()
    if target.budget != "modules":
        raise ValueError("search.problem 'skip_plan' removes a count of sublayers: it needs target.budget 'modules'")
    sizes = {k: v for k in ("seq_len", "calib_windows") if (v := getattr(opts, k))}
    ev = Evaluator(dataclasses.replace(spec, protocol=spec.protocol.with_(**sizes), fitness="perplexity"))
    order, _ = ranked(ev.ctx, Method(opts.order), target)
    seeds = [ranked(ev.ctx, Method(name.strip()), target)[1] for name in opts.seeds.split(",") if name.strip()]
    names = sorted(order)
    return SkipPlanProblem(config.search, opts, names, removed_count(len(names), target.ratio), order, seeds)


def moe_shape(model: str) -> tuple[int, int]:
    """(MoE layers, routed experts per layer) from a model's config alone (no weights loaded)."""
    config = saved_config(model_source(model))  # a directory a mode saved keeps its real config apart
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    experts = next((getattr(config, a) for a in expert_count_attrs(config) if getattr(config, a)), None)
    if not experts:
        raise ValueError(f"search.problem 'experts': {model} has no routed experts in its config")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(f"{model} mixes dense and MoE layers: give problem.layers and problem.experts")
    return int(config.num_hidden_layers), int(experts)


def block_count(model: str) -> int:
    if model == "toy":
        return TOY_BLOCKS

    return count_blocks(model)


PROBLEMS = {"metric": _metric, "allocation": _allocation, "joint": _joint, "experts": _experts,
            "skip_plan": _skip_plan}


def check_problem(problem: str, mode: str) -> None:
    """A problem the campaign's mode accepts (its recipe's `problems`); errors name the key."""
    if problem not in PROBLEMS:
        raise ValueError(f"search.problem: unknown problem {problem!r}; problems: {', '.join(PROBLEMS)}")
    accepted = get_mode(mode).problems
    if problem not in accepted:
        raise ValueError(f"search.problem: {problem!r} does not apply in mode {mode!r}; its problems: "
                         f"{', '.join(accepted)}")


def make_problem(config):
    """The problem a campaign configuration names, built for its model and target."""
    check_problem(config.search.problem, config.eval.mode)
    return PROBLEMS[config.search.problem](config)
