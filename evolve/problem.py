"""The GP problem: DEAP primitive set over W, G, X, the individual type, tree conversions, and
`MetricProblem` — the problem the engine runs to evolve metrics (problems.py lists the others).

This module only *defines* the problem (as DEAP's symbreg example does); the loop lives in
`engine.py` and calls toolbox aliases and the problem's methods only.

Operator sets
-------------
``pruner-zero`` (the default) is the search space of the released Pruner-Zero code
(pprp/Pruner-Zero, lib/gptree.py: binary add, sub, mul, div; unary sqr, neg, abs, log, exp,
sqrt, tanh, mms, zsn, pow, skp) with two operators dropped — `pow` is `sqr` again and `skp` is
the identity, which only adds nodes — and `sigmoid` added, which the paper's search space
names. ``extended`` adds `rownorm` and `colnorm` so that relative-importance metrics (RIA) are
expressible.

Constants
---------
The search space has no constant terminals (as in Pruner-Zero: terminals are W, G, X only),
but simplification folds constants (add(W, W) → mul(2.0, W)). Such numbers become plain,
non-symbolic DEAP terminals (`gp.Terminal(2.0, False, object)`) that print as `repr(float)` —
exactly as `Node` prints them — so every tree converts to a string and back without loss.
Mutation never *creates* constants; it may replace one by a terminal.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from functools import lru_cache

from deap import base, creator, gp, tools

from prunerzero.core.fields import build
from prunerzero.primitives.expression import Node, parse
from prunerzero.primitives.metric import Metric, resolve_metric
from prunerzero.primitives.operators import OPERATORS
from prunerzero.primitives.terminals import TERMINALS

from .oos_pool import OOSPool
from .simplify import simplify

OPERATOR_SETS: dict[str, tuple[str, ...]] = {
    "pruner-zero": ("add", "sub", "mul", "div", "abs", "neg", "sqr", "sqrt", "log", "exp",
                    "tanh", "sigmoid", "mms", "zscore"),
}
OPERATOR_SETS["extended"] = OPERATOR_SETS["pruner-zero"] + ("rownorm", "colnorm")
OPERATOR_SETS["constants"] = OPERATOR_SETS["extended"] + ("pow",)  # with [problem] constants = true

# Ephemeral constants are drawn from this grid (it holds RIA's and Wanda's exponent 0.5); the
# refinement moves them off it (x0.5, x2, ±0.25) where that measures better.
CONSTANTS = (-1.0, -0.5, 0.25, 0.5, 1.0, 2.0, 3.0)
REFINE_MOVES = (lambda c: c * 0.5, lambda c: c * 2.0, lambda c: c - 0.25, lambda c: c + 0.25)

# DEAP's creator classes are module globals of `deap.creator`: create them once per process.
# Fitness values are (evaluation windows, perplexity) with weights (+1, -1): compared
# lexicographically, a candidate measured on more windows (it survived every successive-halving
# rung) beats one eliminated early, then the lower perplexity wins. Without multi-fidelity
# every candidate has the same windows and this is plain perplexity minimisation.
if not hasattr(creator, "PZFitness"):
    creator.create("PZFitness", base.Fitness, weights=(1.0, -1.0))
if not hasattr(creator, "PZIndividual"):
    creator.create("PZIndividual", gp.PrimitiveTree, fitness=creator.PZFitness)

Individual = creator.PZIndividual


def operator_set(name: str) -> tuple[str, ...]:
    try:
        return OPERATOR_SETS[name]
    except KeyError:
        raise ValueError(f"unknown operator set {name!r}; known: {', '.join(OPERATOR_SETS)}") from None


def draw_constant() -> float:
    return random.choice(CONSTANTS)


@lru_cache(maxsize=None)
def primitive_set(set_name: str = "pruner-zero", constants: bool = False) -> gp.PrimitiveSet:
    """The primitive set of an operator set: one per name and process (DEAP trees refer to its
    primitives; the functions are never called — trees are scored through `Node`). With
    `constants`, ephemeral constants join the terminals."""
    pset = gp.PrimitiveSet("metric", len(TERMINALS))
    pset.renameArguments(**{f"ARG{i}": t for i, t in enumerate(TERMINALS)})
    for name in operator_set(set_name):
        op = OPERATORS[name]
        pset.addPrimitive(op.torch_fn, op.arity, name=op.name)
    if constants:
        pset.addEphemeralConstant(f"pz_constant_{set_name.replace('-', '_')}", draw_constant)
    return pset


def to_node(tree: gp.PrimitiveTree) -> Node:
    """DEAP tree → Node, through the shared prefix string form."""
    return parse(str(tree))


def from_node(node: Node, pset: gp.PrimitiveSet) -> Individual:
    """Node → DEAP individual (a direct prefix walk: nothing is evaluated)."""
    out: list = []
    _walk(node, pset, out)
    return Individual(out)


def _walk(node: Node, pset: gp.PrimitiveSet, out: list) -> None:
    if node.name == "const":
        out.append(gp.Terminal(float(node.value), False, object))
        return
    prim = pset.mapping.get(node.name)
    if prim is None:
        raise ValueError(f"operator {node.name!r} is not in the primitive set ({', '.join(sorted(pset.mapping))})")
    out.append(prim)
    for child in node.children:
        _walk(child, pset, out)


def from_string(text: str, pset: gp.PrimitiveSet) -> Individual:
    return from_node(parse(text), pset)


height = operator.attrgetter("height")


@dataclass(frozen=True)
class Prepared:
    """An offspring made ready for evaluation: the individual to evaluate (with its `.key`), or
    why it is rejected without an evaluation."""

    individual: object
    rejected: str = ""

    @property
    def ok(self) -> bool:
        return not self.rejected


def mutate(individual, expr, pset, point_prob: float):
    """Point mutation (one node replaced by another of the same arity) or subtree mutation."""
    if random.random() < point_prob:
        return gp.mutNodeReplacement(individual, pset)
    return gp.mutUniform(individual, expr, pset)


@dataclass(frozen=True)
class MetricOptions:
    constants: bool = False  # ephemeral constants among the terminals (pair with operators = "constants")
    refine: int = 0  # each generation, the constants of this many of the best offspring are refined
    # metrics in generation 0 beside the random trees, "; "-separated (built-in names or expressions):
    # a search that starts from the hand-made choices it is compared with, as the skip and experts GAs do
    seeds: str = ""


class MetricProblem:
    """GP over metric trees (Pruner-Zero): ramped half-and-half trees, one-point crossover, point
    and subtree mutation under static depth and size limits; Opposing Operation Simplification
    prepares every offspring (a rejected one is redrawn by the engine). With constants, trees
    hold numbers drawn from a grid, and the best offspring's numbers are refined by a few
    deterministic moves, each measured like any candidate (`refinements`)."""

    name = "metric"
    columns = ("size", "depth")  # its own hall-of-fame columns

    def __init__(self, search, options: dict | None = None):
        self.options = build(MetricOptions, dict(options or {}), "problem", ValueError)
        if self.options.refine < 0:
            raise ValueError("problem.refine: must be >= 0")
        if self.options.refine and not self.options.constants:
            raise ValueError("problem.refine: refines constants; set problem.constants = true")
        self.search = search
        self.refine = self.options.refine
        self.pset = primitive_set(search.operators, self.options.constants)
        self._seeds = [self._seed(text.strip()) for text in self.options.seeds.split(";") if text.strip()]
        self.ops = frozenset(operator_set(search.operators))
        self._pool = OOSPool(search.oos_workers)
        self._pool.start()  # the workers import while the campaign loads its evaluators
        self._simplified: dict = {}  # tree -> OOS outcome, from the pool

    def toolbox(self) -> base.Toolbox:
        s, pset = self.search, self.pset
        tb = base.Toolbox()
        tb.register("expr", gp.genHalfAndHalf, pset=pset, min_=s.init_min_depth, max_=s.init_max_depth)
        tb.register("individual", tools.initIterate, Individual, tb.expr)
        tb.register("population", tools.initRepeat, list, tb.individual)
        tb.register("select", tools.selTournament, tournsize=s.tournament)
        tb.register("mate", gp.cxOnePoint)
        tb.register("expr_mut", gp.genFull, min_=0, max_=2)
        tb.register("mutate", mutate, expr=tb.expr_mut, pset=pset, point_prob=s.point_mutation)
        for op in ("mate", "mutate"):
            tb.decorate(op, gp.staticLimit(key=height, max_value=s.max_depth))
            tb.decorate(op, gp.staticLimit(key=len, max_value=s.max_size))
        return tb

    def _seed(self, text: str) -> Individual:
        try:
            return from_node(resolve_metric(text, allow_code=False).tree, self.pset)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"problem.seeds: {text!r}: {e}") from None

    def seeds(self) -> list:
        return list(self._seeds)  # none by default: from scratch, as Pruner-Zero

    def prepare_many(self, individuals: list) -> None:
        """OOS of a generation's new trees side by side (`search.oos_workers`); `prepare` then
        finds them done. Outcomes are the same as `prepare` alone would compute. In the driver
        alone there is nothing to gain: `simplify`'s own cache serves `prepare`."""
        if self._pool.workers <= 1:
            return
        trees = list(dict.fromkeys(t for t in map(to_node, individuals) if t not in self._simplified))
        if len(self._simplified) + len(trees) > 65536:
            self._simplified.clear()
        self._simplified.update(zip(trees, self._pool.map(trees, self.ops, self.search.max_depth, self.search.max_size)))

    def close(self) -> None:
        self._pool.close()

    def prepare(self, ind) -> Prepared:
        """OOS: the simplified tree replaces the offspring; its canonical form is the key."""
        tree = to_node(ind)
        outcome = self._simplified.get(tree) or simplify(tree, self.ops, self.search.max_depth, self.search.max_size)
        if outcome.ok:
            ind = from_node(outcome.tree, self.pset)
        ind.key = outcome.key
        return Prepared(ind, outcome.rejected)

    def candidate(self, ind) -> str:
        return str(ind)

    def describe(self, ind) -> str:
        return str(ind)

    def size(self, ind) -> int:
        return len(ind)

    def fields(self, ind) -> dict:
        return {"size": len(ind), "depth": ind.height}

    def encode(self, ind) -> str:
        return str(ind)

    def decode(self, data: str):
        ind = from_string(data, self.pset)
        ind.key = Metric(data, to_node(ind)).key
        return ind

    def refinements(self, ind) -> list:
        """Trees with one constant moved (x0.5, x2, -0.25, +0.25), for the first two constants:
        deterministic, so a resumed campaign refines alike."""
        node = to_node(ind)
        out = []
        for path in _constant_paths(node)[:2]:
            value = _at(node, path).value
            for move in REFINE_MOVES:
                moved = round(move(value), 6)
                if moved != value:
                    out.append(from_node(_replace(node, path, Node("const", (), moved)), self.pset))
        return out


def _constant_paths(node: Node, path: tuple = ()) -> list[tuple]:
    if node.name == "const":
        return [path]
    return [p for i, c in enumerate(node.children) for p in _constant_paths(c, (*path, i))]


def _at(node: Node, path: tuple) -> Node:
    for i in path:
        node = node.children[i]
    return node


def _replace(node: Node, path: tuple, new: Node) -> Node:
    if not path:
        return new
    kids = list(node.children)
    kids[path[0]] = _replace(kids[path[0]], path[1:], new)
    return Node(node.name, tuple(kids), node.value)
