"""The GP problem: DEAP primitive set over W, G, X, the individual type, and tree conversions.

This module only *defines* the problem (as DEAP's symbreg example does); the loop lives in
`engine.py` and calls toolbox aliases only.

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
from functools import lru_cache

from deap import base, creator, gp

from prunerzero.primitives.expression import Node, parse
from prunerzero.primitives.operators import OPERATORS
from prunerzero.primitives.terminals import TERMINALS

OPERATOR_SETS: dict[str, tuple[str, ...]] = {
    "pruner-zero": ("add", "sub", "mul", "div", "abs", "neg", "sqr", "sqrt", "log", "exp",
                    "tanh", "sigmoid", "mms", "zscore"),
}
OPERATOR_SETS["extended"] = OPERATOR_SETS["pruner-zero"] + ("rownorm", "colnorm")

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


@lru_cache(maxsize=None)
def primitive_set(set_name: str = "pruner-zero") -> gp.PrimitiveSet:
    """The primitive set of an operator set: one per name and process (DEAP trees refer to its
    primitives; the functions are never called — trees are scored through `Node`)."""
    pset = gp.PrimitiveSet("metric", len(TERMINALS))
    pset.renameArguments(**{f"ARG{i}": t for i, t in enumerate(TERMINALS)})
    for name in operator_set(set_name):
        op = OPERATORS[name]
        pset.addPrimitive(op.torch_fn, op.arity, name=op.name)
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
