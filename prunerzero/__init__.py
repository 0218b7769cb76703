"""prunerzero: discover LLM pruning metrics by genetic programming and apply them.

The library's entry points, by job (the CLI `prunerzero` is a thin face on them):
- metrics: `prunerzero.primitives.metric.resolve_metric`, `Metric`
- pruning: `prunerzero.fitness.evaluator.Evaluator` (model + statistics + prune/measure/restore),
  `prunerzero.pruning.unstructured.mode.prune_with_metric`, `prunerzero.pruning.unstructured.sparsegpt.prune_sparsegpt`
- search: `prunerzero.evolve.run_campaign`, `resume_campaign`, `export_run`
- results: `prunerzero.jobs.leaderboard_rows`, `prunerzero.leaderboard`
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prunerzero")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
