"""Opposing Operation Simplification (OOS): every offspring goes through SymPy before it is
evaluated.

1. `to_sympy` already cancels what SymPy's automatic evaluation knows: neg∘neg, exp∘log and
   log∘exp (the operators' SymPy forms carry `log|a|`, `√|a|`), sqrt∘sqr, abs∘abs, abs of a
   non-negative expression, x−x, x/x, x+0, x·1, and constant folding.
2. `normalisation_rules` adds what SymPy cannot know about the opaque layer-wise operators:
   mms and zscore are idempotent, absorb each other, and ignore a positive affine map of their
   argument; rownorm and colnorm are idempotent and ignore a positive factor.
3. `sympy.simplify` runs when the expression is small (a deterministic bound, not a timer:
   the same offspring must simplify the same way on every machine, or a seeded campaign would
   not repeat).
4. The result becomes a tree again (`from_sympy`). It replaces the offspring only if it is
   expressible with the campaign's primitives, within the size and depth limits, and scores the
   probe tensors like the original (a guard against an unsound rewrite).

An expression that no longer depends on any terminal, or whose scores are constant on the probe
tensors, is rejected without an evaluation. The canonical key (`Metric.key`) of the simplified
tree is the key for de-duplication and the fitness cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch

from prunerzero.primitives.expression import ExpressionError, Node, from_sympy
from prunerzero.primitives.metric import Metric
from prunerzero.primitives.operators import Colnorm, Mms, Rownorm, Zscore

SIMPLIFY_MAX_OPS = 24  # sympy.simplify only below this many operations (it is super-linear)
_RULE_PASSES = 4


@dataclass(frozen=True)
class Simplified:
    """The outcome of OOS for one tree: the tree to keep and its canonical key, or a rejection."""

    tree: Node
    key: str
    rejected: str = ""  # why the individual is rejected without evaluation; "" if kept

    @property
    def ok(self) -> bool:
        return not self.rejected


# ---------------------------------------------------------------- rules SymPy lacks
def _affine_parts(arg: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """arg = c·a + d with numbers c, d: return (c, a)."""
    _, rest = arg.as_coeff_Add()
    return rest.as_coeff_Mul()


def _rewrite_normaliser(e: sympy.Expr) -> sympy.Expr:
    (arg,) = e.args
    if e.func in (Mms, Zscore):
        c, a = _affine_parts(arg)  # mms and zscore ignore a positive affine map
        if a.func in (Mms, Zscore):  # ... and the other normaliser is one
            a = a.args[0]
        if c.is_positive:
            return e.func(a)
        if c.is_negative and e.func is Zscore:
            return -Zscore(a)  # zscore(-a) = -zscore(a)
        return e
    c, a = arg.as_coeff_Mul()  # rownorm(c·a) = sign(c)·rownorm(a)
    if a.func is e.func:
        a = a.args[0]  # rownorm is idempotent (rows of a rownorm sum to 1 in |.|)
    if c.is_positive:
        return e.func(a)
    if c.is_negative:
        return -e.func(a)
    return e


def normalisation_rules(expr: sympy.Expr) -> sympy.Expr:
    """Apply the sound rewrites of the layer-wise normalisers to a fixpoint (bounded)."""
    funcs = (Mms, Zscore, Rownorm, Colnorm)
    for _ in range(_RULE_PASSES):
        new = expr.replace(lambda e: e.func in funcs, _rewrite_normaliser)
        if new == expr:
            break
        expr = new
    return expr


def canonical(expr: sympy.Expr) -> sympy.Expr:
    """The simplified expression: the cheap rules, then sympy.simplify when it is affordable."""
    cheap = normalisation_rules(sympy.powsimp(expr))
    if sympy.count_ops(cheap) > SIMPLIFY_MAX_OPS:
        return cheap
    full = normalisation_rules(sympy.simplify(cheap))
    return full if sympy.count_ops(full) <= sympy.count_ops(cheap) else cheap


# ---------------------------------------------------------------- probes
@lru_cache(maxsize=1)
def probe_tensors() -> list[dict[str, torch.Tensor]]:
    """Fixed random (W, G, X) at unit scale and at a trained LLM's scale (float64, so that the
    comparison sees the rewrite, not fp32 rounding)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for w, gr, x in ((1.0, 1.0, 1.0), (0.02, 1e-3, 0.1)):
        out.append({
            "W": torch.randn(12, 16, generator=g, dtype=torch.float64) * w,
            "G": torch.rand(12, 16, generator=g, dtype=torch.float64) * gr + gr * 0.05,
            "X": torch.rand(16, generator=g, dtype=torch.float64) * x + x * 0.05,
        })
    return out


def probe_scores(metric: Metric) -> list[torch.Tensor] | None:
    """Scores on the probes, or None where an operator cannot take its argument (a constant
    subtree under colnorm, say)."""
    try:
        return [metric(**p) for p in probe_tensors()]
    except (RuntimeError, IndexError, ValueError):
        return None


def is_constant(scores: list[torch.Tensor]) -> bool:
    """Constant scores on every probe: the metric cannot rank weights."""
    return all(bool((s == s.flatten()[0]).all()) for s in scores)


def same_scores(a: list[torch.Tensor], b: list[torch.Tensor] | None) -> bool:
    """Equal up to the operators' protective epsilons (log|a|+1e-8 is not log|a|); an unsound
    rewrite changes scores by far more."""
    return b is not None and all(
        torch.allclose(x, y, rtol=1e-3, atol=1e-6 * (1.0 + float(x.abs().max()))) for x, y in zip(a, b))


# ---------------------------------------------------------------- the OOS step
@lru_cache(maxsize=65536)
def simplify(tree: Node, allowed_ops: frozenset[str] | None = None,
             max_depth: int | None = None, max_size: int | None = None) -> Simplified:
    """OOS for one tree. Deterministic and pure: the same tree always gives the same result."""
    original = Metric(str(tree), tree)
    try:
        expr = canonical(original.sympy)
    except Exception:  # SymPy's simplifiers raise many error types; keep SymPy's evaluated form
        expr = original.sympy
    if not expr.free_symbols:
        return Simplified(tree, original.key, f"no terminal left: simplifies to {expr}")
    scores = probe_scores(original)
    if scores is None:
        return Simplified(tree, original.key, "cannot be scored on the probe tensors")
    if is_constant(scores):
        return Simplified(tree, original.key, "constant scores on the probe tensors")
    for candidate in (expr, original.sympy):
        new = _as_tree(candidate, allowed_ops, max_depth, max_size)
        if new is not None and same_scores(scores, probe_scores(new)):
            return Simplified(new.tree, new.key)
    return Simplified(tree, original.key)


def tidy(node: Node) -> Node:
    """Undo what `from_sympy` spells longer than needed, keeping the scores bit for bit:
    the operators sqrt and log already take |a|, and a + (-b) is a - b in IEEE arithmetic."""
    kids = tuple(tidy(c) for c in node.children)
    if node.name in ("sqrt", "log") and kids[0].name == "abs":
        return Node(node.name, kids[0].children)
    if node.name == "add" and kids[1].name == "neg":
        return Node("sub", (kids[0], kids[1].children[0]))
    if node.name == "add" and kids[0].name == "neg":
        return Node("sub", (kids[1], kids[0].children[0]))
    return Node(node.name, kids, node.value)


def _as_tree(expr: sympy.Expr, allowed_ops, max_depth, max_size) -> Metric | None:
    try:
        node = tidy(from_sympy(expr))
    except ExpressionError:
        return None
    if allowed_ops is not None and not node.operators() <= allowed_ops:
        return None
    if (max_depth is not None and node.depth() - 1 > max_depth) or (max_size is not None and node.size() > max_size):
        return None
    return Metric(str(node), node)
