"""Opposing Operation Simplification (OOS): every offspring goes through SymPy before it is
evaluated.

1. `to_sympy` already cancels what SymPy's automatic evaluation knows: neg∘neg, exp∘log and
   log∘exp (the operators' SymPy forms carry `log|a|`, `√|a|`), sqrt∘sqr, abs∘abs, abs of a
   non-negative expression, x−x, x/x, x+0, x·1, and constant folding.
2. `normalisation_rules` adds what SymPy cannot know about the opaque layer-wise operators:
   mms and zscore are idempotent, absorb each other, and ignore a positive affine map of their
   argument; rownorm and colnorm are idempotent and ignore a positive factor.
3. `sympy.simplify` runs when the expression is small (a deterministic bound on its size), and
   within SIMPLIFY_SECONDS of wall time: a few small expressions send it into minutes. The timer
   is a safety net, so that one offspring cannot stall a campaign; an expression that ran out of
   time is recorded (`timed_out`, saved in the campaign's checkpoint) and gets the cheap form from
   then on, so a resumed campaign decides exactly as the interrupted one did.
4. The result becomes a tree again (`from_sympy`). It replaces the offspring only if it is
   expressible with the campaign's primitives, within the size and depth limits, and ranks the
   probe statistics exactly as the original does — zeros and ties included (primitives/probes.py):
   the same masks at every sparsity, not merely close scores. x/x = 1 is algebra, but div(0, 0)
   is 0: such a rewrite is refused, and the offspring is evaluated as it is. And the masks the
   pipeline cuts must be the same: the torch forms at float32, on probes over the ranges real
   statistics take (G down to 1e-9, X up to 6e4): exp(a)·exp(b) = exp(a + b) on the reals, but
   not where exp saturates (G ≈ 1e-6) — refused too.

An expression that no longer depends on any terminal, or whose scores are constant on the probe
tensors, is rejected without an evaluation. The key is `Metric.key` of the tree kept, which is
sound by the same test (`probes.ranks_alike`): two trees share a key only if they rank the exact
probes alike and cut the same float32 masks on the real-range ones.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import sympy

from prunerzero.primitives.expression import ExpressionError, Node, from_sympy
from prunerzero.primitives.metric import Metric
from prunerzero.primitives.operators import Colnorm, Mms, Rownorm, Zscore
from prunerzero.primitives.probes import float32_scores, is_constant, probe_scores, same_float32_masks, same_ranking

SIMPLIFY_MAX_OPS = 24  # sympy.simplify only below this many operations (it is super-linear)
SIMPLIFY_SECONDS = 5.0  # and only this long (typical: 10-500 ms)
_RULE_PASSES = 4
timed_out: set[str] = set()  # expressions (sympy srepr) whose sympy.simplify ran out of time


class SimplifyTimeout(BaseException):
    """Raised into sympy.simplify by a timer. A BaseException, so that no `except Exception` on
    the way (SymPy has many) can swallow it."""


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
    name = sympy.srepr(cheap)
    if name in timed_out:
        return cheap
    try:
        with _time_limit(SIMPLIFY_SECONDS):
            full = normalisation_rules(sympy.simplify(cheap))
    except SimplifyTimeout:
        timed_out.add(name)
        return cheap
    return full if sympy.count_ops(full) <= sympy.count_ops(cheap) else cheap


@contextmanager
def _time_limit(seconds: float):
    """Raise SimplifyTimeout after `seconds` (a SIGALRM timer: the main thread only; elsewhere
    no limit — campaigns run their engine in the main thread)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise SimplifyTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
        return Simplified(tree, original.key, f"no terminal left: simplifies to {_short(expr)}")
    scores = probe_scores(original)
    if scores is None:
        return Simplified(tree, original.key, "cannot be scored on the probe tensors")
    if is_constant(scores):
        return Simplified(tree, original.key, "constant scores on the probe tensors")
    scores32 = None  # the original's float32 scores, computed only when a candidate gets that far
    for candidate in (expr, original.sympy):
        new = _as_tree(candidate, allowed_ops, max_depth, max_size)
        if new is not None and new.tree == tree:
            return Simplified(tree, original.key)  # nothing to compare: the same tree
        if new is None or not same_ranking(scores, probe_scores(new)):
            continue
        if scores32 is None:
            scores32 = float32_scores(original)
        if same_float32_masks(scores32, float32_scores(new)):
            return Simplified(new.tree, new.key)
    return Simplified(tree, original.key)


def _short(expr) -> str:
    text = str(expr)
    return text if len(text) <= 80 else text[:77] + "..."


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
