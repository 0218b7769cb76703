"""Expression trees over the terminals W, G, X and the operator table, and the one conversion
chain: string ⇄ tree → SymPy → tree, tree → torch callable, tree → Python source.

A tree prints as the same prefix string DEAP prints for a `PrimitiveTree`
("mul(abs(W), sqrt(X))"), so a string, a tree and a DEAP individual convert into each other
without loss. Strings are parsed with `ast` — nothing is ever evaluated.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping

import sympy
import torch

from .operators import OPAQUE_SYMPY, OPERATORS, get_operator
from .terminals import SYMBOLS, TERMINALS


class ExpressionError(ValueError):
    """A malformed or unsupported metric expression."""


@dataclass(frozen=True)
class Node:
    """One node of an expression tree: a terminal (W, G, X), a constant, or an operator call."""

    name: str  # operator name, terminal name, or "const"
    children: tuple["Node", ...] = ()
    value: float | None = None  # for constants

    def __str__(self) -> str:
        if self.name == "const":
            return repr(float(self.value))
        if not self.children:
            return self.name
        return f"{self.name}({', '.join(str(c) for c in self.children)})"

    def terminals(self) -> frozenset[str]:
        if self.name in TERMINALS:
            return frozenset({self.name})
        out: frozenset[str] = frozenset()
        for c in self.children:
            out |= c.terminals()
        return out

    def operators(self) -> frozenset[str]:
        out = frozenset({self.name}) if self.name in OPERATORS else frozenset()
        for c in self.children:
            out |= c.operators()
        return out

    def size(self) -> int:
        return 1 + sum(c.size() for c in self.children)

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children), default=0)


def const(v: float) -> Node:
    return Node("const", (), float(v))


# ---------------------------------------------------------------- string → tree (safe parser)
MAX_DEPTH = 200  # deeper than any search's limit by far; Python's parser and recursion give out beyond


def _shown(text) -> str:
    """The expression as error messages show it: a 50 KB one is not echoed whole."""
    r = repr(text)
    return r if len(r) <= 100 else f"{r[:60]}…{r[-30:]} ({len(text)} characters)"


def parse(text: str) -> Node:
    """Parse "mul(abs(W), sqrt(X))" into a tree. Only calls of known operators with the right
    number of arguments, the terminals W, G, X and numbers are accepted."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"malformed expression {_shown(text)}: empty")
    if text.count("(") > MAX_DEPTH and _nesting(text) > MAX_DEPTH:
        raise ExpressionError(f"malformed expression {_shown(text)}: nested deeper than {MAX_DEPTH} calls")
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ExpressionError(f"malformed expression {_shown(text)}: {e.msg} at column {e.offset}") from None
    return _from_ast(body, text)


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


def _from_ast(n: ast.AST, text: str) -> Node:
    if isinstance(n, ast.Name):
        if n.id in TERMINALS:
            return Node(n.id)
        raise ExpressionError(
            f"malformed expression {_shown(text)}: unknown terminal {n.id!r} (terminals: {', '.join(TERMINALS)})"
        )
    if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
        return _finite_const(n.value, text)
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant):
        return const(-_from_ast(n.operand, text).value)
    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
        if n.func.id not in OPERATORS:
            raise ExpressionError(
                f"malformed expression {_shown(text)}: unknown operator {n.func.id!r} "
                f"(operators: {', '.join(sorted(OPERATORS))})"
            )
        op = OPERATORS[n.func.id]
        if len(n.args) != op.arity:
            raise ExpressionError(
                f"malformed expression {_shown(text)}: {op.name} takes {op.arity} argument(s), got {len(n.args)}"
            )
        return Node(op.name, tuple(_from_ast(a, text) for a in n.args))
    raise ExpressionError(
        f"malformed expression {_shown(text)}: unexpected {ast.unparse(n)!r}; "
        "write operator calls over W, G, X and numbers, e.g. mul(abs(W), sqrt(X))"
    )


def _finite_const(value: int | float, text: str) -> Node:
    # 1e400 parses as inf and a 400-digit integer overflows float: neither is a usable constant
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise ExpressionError(f"malformed expression {_shown(text)}: constant {value!r:.40} is not finite in float")
    return const(v)


# ---------------------------------------------------------------- tree → SymPy
def to_sympy(node: Node) -> sympy.Expr:
    if node.name == "const":
        return sympy.nsimplify(node.value, rational=True) if float(node.value).is_integer() else sympy.Float(node.value)
    if node.name in TERMINALS:
        return SYMBOLS[node.name]
    return get_operator(node.name).sympy_fn(*(to_sympy(c) for c in node.children))


# ---------------------------------------------------------------- SymPy → tree
def from_sympy(expr: sympy.Expr) -> Node:
    """Turn a (simplified) SymPy expression back into a tree of table operators. Raises
    ExpressionError naming the SymPy construct when no operator of the table expresses it."""
    if expr.is_Symbol:
        if expr.name not in TERMINALS:
            raise ExpressionError(f"cannot express symbol {expr} as a tree")
        return Node(expr.name)
    if expr.is_Number:
        if not expr.is_finite:
            raise ExpressionError(f"cannot express the non-finite number {expr} as a tree")
        return const(float(expr))
    if expr.is_Add:
        return _fold("add", expr.as_ordered_terms())
    if expr.is_Mul:
        return _from_mul(expr)
    if expr.is_Pow:
        return _from_pow(expr.base, expr.exp)
    if isinstance(expr, sympy.Abs):
        return Node("abs", (from_sympy(expr.args[0]),))
    if isinstance(expr, sympy.exp):
        return Node("exp", (from_sympy(expr.args[0]),))
    if isinstance(expr, sympy.log):
        return Node("log", (from_sympy(expr.args[0]),))
    if isinstance(expr, sympy.tanh):
        return Node("tanh", (from_sympy(expr.args[0]),))
    if expr.func in OPAQUE_SYMPY:
        return Node(OPAQUE_SYMPY[expr.func], (from_sympy(expr.args[0]),))
    raise ExpressionError(
        f"cannot express {expr} ({type(expr).__name__}) with the operator table "
        "(extend from_sympy in primitives/expression.py)"
    )


def _fold(op: str, args) -> Node:
    nodes = [from_sympy(a) for a in args]
    out = nodes[0]
    for n in nodes[1:]:
        out = Node(op, (out, n))
    return out


def _from_mul(expr: sympy.Mul) -> Node:
    coeff, rest = expr.as_coeff_mul()
    num, den = [], []
    for f in rest:
        if f.is_Pow and f.exp.is_Number and f.exp < 0:
            den.append(f.base ** (-f.exp))
        else:
            num.append(f)
    negative = coeff < 0
    coeff = abs(coeff)
    if coeff != 1:
        if coeff.is_Rational and coeff.q != 1:
            # keep exact rationals as num/den: 3/4 → div(mul(3, …), 4)
            if coeff.p != 1:
                num.insert(0, sympy.Integer(coeff.p))
            den.insert(0, sympy.Integer(coeff.q))
        else:
            num.insert(0, coeff)
    top = _fold("mul", num) if num else const(1.0)
    out = Node("div", (top, _fold("mul", den))) if den else top
    return Node("neg", (out,)) if negative else out


def _from_pow(base: sympy.Expr, exp: sympy.Expr) -> Node:
    if not exp.is_Rational or exp.q & (exp.q - 1):
        # not a chain of square roots: the pow operator, |base|^exp (a set without it refuses the tree)
        return Node("pow", (from_sympy(base), from_sympy(exp)))
    e = Fraction(int(exp.p), int(exp.q))
    if e < 0:
        return Node("div", (const(1.0), _from_pow(base, sympy.Rational(-e.numerator, e.denominator))))
    b = from_sympy(base)
    # x**(p/2^k): k square roots of x**p
    out = _int_power(b, e.numerator)
    d = e.denominator
    while d > 1:
        out = Node("sqrt", (out,))
        d //= 2
    return out


def _int_power(b: Node, p: int) -> Node:
    if p == 1:
        return b
    if p % 2 == 0:
        return Node("sqr", (_int_power(b, p // 2),))
    return Node("mul", (b, _int_power(b, p - 1)))


# ---------------------------------------------------------------- tree → torch callable
Compiled = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def compile_tree(node: Node) -> Compiled:
    """Compose the tree into one callable over a terminal mapping {"W": …, "G": …, "X": …}."""
    if node.name == "const":
        v = float(node.value)
        return lambda env: torch.full_like(env["W"], v)  # full shape: layer-wise operators apply to it too
    if node.name in TERMINALS:
        name = node.name
        return lambda env: env[name]
    op = get_operator(node.name)
    kids = [compile_tree(c) for c in node.children]
    if len(kids) == 1:
        (a,) = kids
        return lambda env: op(a(env))
    a, b = kids
    return lambda env: op(a(env), b(env))


# ---------------------------------------------------------------- tree → Python source
def to_source(node: Node) -> str:
    """A Python expression over W, G, X calling the operators' own torch functions (op_<name>),
    each result passed through _finite exactly as the framework does."""
    if node.name == "const":
        return f"torch.full_like(W, {float(node.value)!r})"
    if node.name in TERMINALS:
        return node.name
    return f"_finite(op_{node.name}({', '.join(to_source(c) for c in node.children)}))"
