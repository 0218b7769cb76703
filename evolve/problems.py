"""What a campaign can evolve: the problems the engine runs, by name (`[search] problem`).

- `metric` (default): GP over metric trees — the Pruner-Zero search; a campaign in any mode
  evolves the metric that mode applies (`[eval] mode`).
- `allocation`: GA over per-block sparsity levels for a fixed metric at a fixed total
  (EvoPress-style; evolve/genome.py).

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


def _allocation(config):
    spec = config.eval_spec()
    target = spec.prune_target()
    if spec.mode != "unstructured" or getattr(target, "nm", None) is not None:
        raise ValueError("search.problem: 'allocation' sets a sparsity per block: it needs mode 'unstructured' "
                         "with an unstructured pattern")
    return AllocationProblem(config.search, config.problem, target.sparsity, block_count(spec.model))


def block_count(model: str) -> int:
    if model == "toy":
        return TOY_BLOCKS
    from prunerzero.models.loading import count_blocks

    return count_blocks(model)


PROBLEMS = {"metric": _metric, "allocation": _allocation}


def make_problem(config):
    """The problem a campaign configuration names, built for its model and target."""
    try:
        builder = PROBLEMS[config.search.problem]
    except KeyError:
        raise ValueError(f"search.problem: unknown problem {config.search.problem!r}; "
                         f"problems: {', '.join(PROBLEMS)}") from None
    return builder(config)
