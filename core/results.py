"""The light result type every floor shares: what one evaluation of one candidate gave.

It lives on the ground floor (no torch, no model code) so that the search, the cache and the
backends read and write results without importing the evaluator."""

from __future__ import annotations

import math
from dataclasses import dataclass

WORST_FITNESS = 1e10  # fitness of a failed or non-finite evaluation (every fitness is minimised)


@dataclass(frozen=True)
class FitnessResult:
    key: str  # the candidate's canonical key
    value: float  # the fitness measure's value (EvalSpec.fitness: perplexity by default, or KL); lower is better
    status: str  # "ok", "failed" (the candidate's own fault: cached) or "lost" (infrastructure: not cached)
    reason: str = ""
    seconds: float = 0.0
    eval_tokens: int = 0
    sparsity: float = float("nan")  # achieved weight sparsity (nan where the mode removes no weights)
    phenotype: str = ""  # fingerprint of what the candidate changed in the model ("" when unknown)
    measured: bool = True  # False: value taken from an earlier candidate with the same phenotype

    @property
    def perplexity(self) -> float:
        """The value under its default measure's name (campaigns with the default fitness)."""
        return self.value

    @property
    def fitness(self) -> float:
        ok = self.status == "ok" and math.isfinite(self.value)
        return self.value if ok else WORST_FITNESS
