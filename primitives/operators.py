"""The operator table: every operator a metric may use, with its torch, SymPy and source faces.

Each operator is *total*: on any finite input (zeros, negatives, huge values, constant tensors)
it returns finite values of the input's shape. Protection is explicit in the torch form
(`abs` inside `log`/`sqrt`, a signed epsilon in `div`, a clamped `exp`, zeros for a constant
tensor in `mms`/`zscore`) and every result is clamped to ±BOUND so that no later operator can
meet an infinity (and so never make a NaN out of inf - inf or 0 * inf).

The SymPy form states the operator's meaning without the epsilons (`log(x)` means `log|x|`),
which is what Opposing Operation Simplification reasons about. Non-elementwise operators
(`mms`, `zscore`, `rownorm`, `colnorm`) are undefined SymPy functions: opaque to algebra.

To add an operator: write its torch function `op_<name>` (module level: the exporter copies
its source into exported metrics) and add one `Operator` to `OPERATORS` with its SymPy form, then name it in an operator set of
`evolve` if the search should use it. A test runs every operator on adversarial inputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import sympy
import torch

EPS = 1e-8
BOUND = 1e30  # results are clamped to ±BOUND: finite in fp32 (max 3.4e38) with room for one add
EXP_MAX = 60.0  # exp(60) ≈ 1.1e26 < BOUND


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=BOUND, neginf=-BOUND).clamp_(-BOUND, BOUND)


def _safe_den(b: torch.Tensor) -> torch.Tensor:
    # keep the sign of b, push |b| away from zero: div stays finite and monotone in a
    return torch.where(b.abs() < EPS, torch.where(b < 0, -EPS, EPS), b)


def _mms(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(), x.amax()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(x)
    return (x - lo) / span


def _zscore(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    std = x64.std(correction=0)
    if not torch.isfinite(std) or std <= 0:
        return torch.zeros_like(x)
    return ((x64 - x64.mean()) / std).to(x.dtype)


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    return x / _safe_den(x.abs().sum(dim=-1, keepdim=True))


def _colnorm(x: torch.Tensor) -> torch.Tensor:
    return x / _safe_den(x.abs().sum(dim=-2, keepdim=True))


def _opaque(name: str, **assumptions: bool) -> type[sympy.Function]:
    """A SymPy function that algebra cannot see into, printed by its operator name, with the
    range facts it has (so that e.g. abs(mms(G)) simplifies to mms(G))."""
    return type(name, (sympy.Function,), {f"is_{k}": v for k, v in assumptions.items()})


# SymPy faces of the non-elementwise operators, and of sigmoid (kept as one node so a
# simplified tree keeps the operator it had rather than 1/(1+exp(-a))).
Mms = _opaque("mms", real=True, nonnegative=True)
Zscore = _opaque("zscore", real=True)
Rownorm = _opaque("rownorm", real=True)
Colnorm = _opaque("colnorm", real=True)
Sigmoid = _opaque("sigmoid", real=True, positive=True)


def op_add(a, b):
    return a + b


def op_sub(a, b):
    return a - b


def op_mul(a, b):
    return a * b


def op_div(a, b):
    return a / _safe_den(b)


def op_abs(a):
    return a.abs()


def op_neg(a):
    return -a


def op_sqr(a):
    return a * a


def op_sqrt(a):
    return a.abs().sqrt()


def op_log(a):
    return (a.abs() + EPS).log()


def op_exp(a):
    return a.clamp(max=EXP_MAX).exp()


def op_pow(a, b):
    return a.abs().pow(b)


def op_tanh(a):
    return a.tanh()


def op_sigmoid(a):
    return a.sigmoid()


def op_mms(a):
    return _mms(a)


def op_zscore(a):
    return _zscore(a)


def op_rownorm(a):
    return _rownorm(a)


def op_colnorm(a):
    return _colnorm(a)


@dataclass(frozen=True)
class Operator:
    name: str
    arity: int
    torch_fn: Callable[..., torch.Tensor]  # a module-level function: the exporter copies its source
    sympy_fn: Callable[..., sympy.Expr]
    doc: str

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return _finite(self.torch_fn(*args))


OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in [
        Operator("add", 2, op_add, lambda a, b: a + b, "a + b"),
        Operator("sub", 2, op_sub, lambda a, b: a - b, "a - b"),
        Operator("mul", 2, op_mul, lambda a, b: a * b, "a * b"),
        Operator("div", 2, op_div, lambda a, b: a / b, "a / b, |b| pushed to at least 1e-8 keeping its sign"),
        Operator("abs", 1, op_abs, sympy.Abs, "|a|"),
        Operator("neg", 1, op_neg, lambda a: -a, "-a"),
        Operator("sqr", 1, op_sqr, lambda a: a**2, "a²"),
        Operator("sqrt", 1, op_sqrt, lambda a: sympy.sqrt(sympy.Abs(a)), "√|a|"),
        Operator("log", 1, op_log, lambda a: sympy.log(sympy.Abs(a)), "log(|a| + 1e-8)"),
        Operator("exp", 1, op_exp, sympy.exp, "exp(min(a, 60))"),
        Operator("tanh", 1, op_tanh, sympy.tanh, "tanh(a)"),
        Operator("pow", 2, op_pow, lambda a, b: sympy.Abs(a) ** b, "|a|^b (RIA's |x|^0.5 with an evolved exponent)"),
        Operator("sigmoid", 1, op_sigmoid, Sigmoid, "1 / (1 + exp(-a))"),
        Operator("mms", 1, op_mms, Mms, "min-max scale over the layer: (a - min) / (max - min)"),
        Operator("zscore", 1, op_zscore, Zscore, "(a - mean) / std over the layer"),
        Operator("rownorm", 1, op_rownorm, Rownorm, "a / Σ|a| over its output row"),
        Operator("colnorm", 1, op_colnorm, Colnorm, "a / Σ|a| over its input column"),
    ]
}

# SymPy function class → operator name, for turning simplified expressions back into trees.
OPAQUE_SYMPY = {Mms: "mms", Zscore: "zscore", Rownorm: "rownorm", Colnorm: "colnorm", Sigmoid: "sigmoid"}


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown operator {name!r}; known operators: {', '.join(sorted(OPERATORS))} "
            "(add one to OPERATORS in primitives/operators.py)"
        ) from None


def export_source(op_names) -> str:
    """Source of what an exported metric module needs — the helpers and the named operators'
    torch functions — copied from this very module, so that an exported metric computes its
    scores with exactly the code the framework uses."""
    consts = f"EPS = {EPS!r}\nBOUND = {BOUND!r}\nEXP_MAX = {EXP_MAX!r}\n"
    funcs = [_finite, _safe_den, _mms, _zscore, _rownorm, _colnorm]
    funcs += [OPERATORS[n].torch_fn for n in sorted(set(op_names))]
    return consts + "\n\n" + "\n\n".join(inspect.getsource(f) for f in funcs)
