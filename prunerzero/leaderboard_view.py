"""How the leaderboard is shown: a compact text table per mode and setting (`leaderboard --show`)
and one bar chart per mode (`leaderboard --plot`), both read from the CSV (prunerzero.leaderboard).

A row is labelled by what it is, not by where it came from: a hand-made row (a built-in metric or
a method of a mode: wanda, sparsegpt, taylor, REAP …) by its name; a discovered one (its `metric`
is a campaign's run id, an allocation, an expression or a file) by its formula — the shorter of
the tree and its SymPy form, cut to a width — since a run id says nothing about the metric.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pandas as pd

from prunerzero.leaderboard import COLUMNS, SETTING, extras, modes_in
from prunerzero.pruning.modes import MODES
from prunerzero.primitives.metric import BUILTINS

LABEL_WIDTH = 38
HANDMADE = frozenset(BUILTINS) | frozenset(name for r in MODES.values() for name in r.methods)
RUN_ID = re.compile(r"\d{8}-\d{6}")  # a campaign's timestamp: the metric is that campaign's discovery
BEST_MARK = "*"
# bar colours; "other": a row a bench named in words (a variant, a plan), neither a method nor a campaign's
COLORS = {"discovered": "tab:blue", "hand-made": "tab:gray", "best hand-made": "tab:orange", "other": "tab:olive"}


# ------------------------------------------------------------------ labels
def is_handmade(metric: str) -> bool:
    """A built-in metric or a method of a mode, named alone or first ("REAP + merge", "wanda x REAP")."""
    first = re.split(r"[\s(,+]", str(metric).strip().lower(), maxsplit=1)[0]
    return first in HANDMADE


def is_discovered(row) -> bool:
    """A campaign's result (a run id, an allocation) or a metric given as a file or an expression:
    its name says nothing about the metric. Any other name (a bench's "REAP + merge") is a name."""
    metric = str(row["metric"])
    return bool(RUN_ID.search(metric)) or metric.startswith("allocation of") or metric.endswith((".py", ".json")) \
        or metric == str(row.get("formula") or "")


def label(row, width: int = LABEL_WIDTH) -> str:
    metric = str(row["metric"])
    if is_handmade(metric) or not is_discovered(row):
        return cut(metric, width)
    prefix = "alloc. " if metric.startswith("allocation of") else ""
    return cut(prefix + short_formula(str(row.get("formula") or ""), str(row.get("key") or "")), width)


def short_formula(formula: str, key: str) -> str:
    """The shorter of the tree (an allocation's without its per-block list) and its SymPy key."""
    forms = [formula.split(" @ ")[0].strip()]
    sym = key.split("]:", 1)[-1] if key.startswith("allocation[") else key
    sym = sym.removeprefix("tree:")
    if sym and not re.match(r"^[a-z]+:", sym):  # "method:x", "experts:x" name things, not formulas
        forms.append(sym)
    return min((f for f in forms if f), key=len, default=formula)


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def protocol_short(protocol: str) -> str:
    """`calib 32x512 seed 0, eval <= 32x512` of a protocol's description (split and stats are the defaults' kind)."""
    return ", ".join(str(protocol).split(", ")[:2])


# ------------------------------------------------------------------ settings
def settings(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Rows grouped by setting (rows measured alike), in a stable order: model, corpus, protocol, budget."""
    groups = list(df.groupby(SETTING, sort=False, dropna=False))
    return sorted(groups, key=lambda g: (g[1]["model"].iloc[0], g[1]["corpus"].iloc[0], g[1]["protocol"].iloc[0],
                                         _budget_order(g[1]["budget"].iloc[0])))


def _budget_order(budget: str):
    """Budgets by their leading number, then by text (0.5 < 0.6 < 0.7 < 2:4 …)."""
    m = re.match(r"[\d.]+", str(budget))
    try:
        return (0, float(m.group()), str(budget)) if m else (1, 0.0, str(budget))
    except ValueError:
        return (1, 0.0, str(budget))


def best_handmade(rows: pd.DataFrame):
    """The index of the lowest-perplexity hand-made row of a setting, or None."""
    hand = rows[rows["metric"].map(is_handmade) & rows["perplexity"].notna()]
    return hand["perplexity"].idxmin() if len(hand) else None


def _dense(rows: pd.DataFrame) -> float:
    return float(rows["dense_perplexity"].median())


# ------------------------------------------------------------------ the text table
def show(df: pd.DataFrame, mode: str | None = None, width: int | None = None) -> str:
    """The leaderboard as plain text: per mode, per setting, one line a row (best first), columns
    cut to `width` (the terminal's; 100 when piped) — never a cell folded over lines."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    df = df.reindex(columns=list(dict.fromkeys([*COLUMNS, *df.columns])))  # a table built by hand, too
    modes = [mode] if mode else modes_in(df)
    out = []
    for m in modes:
        rows = extras(df, m)
        out += ["", f"== {m} mode: {len(rows)} row(s) =="]
        if not len(rows):
            continue
        columns = _mode_columns(rows)
        for _, group in settings(rows):
            out += _setting_lines(group, columns, width)
    out += [""] + textwrap.wrap(f"({BEST_MARK} the best hand-made row: a built-in metric or a method; "
                                "x dense: perplexity / dense)", width)
    return "\n".join(out)


def _mode_columns(rows: pd.DataFrame) -> list[str]:
    """Columns beside perplexity: the mode's own values (spread from `extra`, its recipe's order),
    then the achieved weight sparsity and the parameters — each only where it says something."""
    own = [c for c in rows.columns if c not in COLUMNS]
    return [c for c in own + ["achieved_sparsity", "params"] if _informative(rows[c])]


def _informative(values: pd.Series) -> bool:
    """A column worth a place: some row has a value, and not every value is 0."""
    present = values.dropna()
    present = present[present.astype(str) != ""]
    return len(present) > 0 and not (pd.to_numeric(present, errors="coerce").fillna(1) == 0).all()


def _setting_lines(group: pd.DataFrame, columns: list[str], width: int) -> list[str]:
    first = group.iloc[0]
    where = f"{first['model']} | {first['corpus']}/{first['split']} | {protocol_short(first['protocol'])}"
    lines = [""] + [line for text in (f"{first['budget']}  (dense {_dense(group):.3f})", where)
                    for line in textwrap.wrap(text, width, subsequent_indent="    ", break_long_words=False,
                                              break_on_hyphens=False)]
    mark = best_handmade(group)
    ordered = group.sort_values("perplexity", na_position="last")
    table = pd.DataFrame({
        " ": [BEST_MARK if i == mark else "" for i in ordered.index],
        "metric / formula": [label(r) for _, r in ordered.iterrows()],
        "perplexity": [_number(v, 2) for v in ordered["perplexity"]],
        "x dense": [_number(v / _dense(group), 2) for v in ordered["perplexity"]],
    })
    for c in columns:
        table[_header(c)] = [_cell(c, v) for v in ordered[c]]
    return lines + _render(table, width)


def _header(column: str) -> str:
    return {"achieved_sparsity": "sparsity"}.get(column, column)


def _cell(column: str, value) -> str:
    if column == "params":
        return "" if pd.isna(value) else f"{float(value) / 1e6:.1f}M"
    if isinstance(value, str):
        return cut(value, 12)
    if value is None or isinstance(value, float) and value != value:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return _number(value, 4)


def _number(value, digits: int) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    if value != value:
        return "nan"
    return f"{value:.{digits}f}" if abs(value) >= 1 or digits <= 2 else f"{value:.{digits}g}"


def _render(table: pd.DataFrame, width: int) -> list[str]:
    """Left-aligned text, right-aligned numbers; the columns that do not fit the width left out."""
    widths = {c: max([len(c)] + [len(v) for v in table[c]]) for c in table.columns}
    kept, used = [], 0
    for c in table.columns:
        if used + widths[c] + 2 > width and len(kept) >= 3:
            break
        kept.append(c)
        used += widths[c] + 2
    left = {" ", "metric / formula"}

    def line(cells):
        return "  ".join(v.ljust(widths[c]) if c in left else v.rjust(widths[c]) for c, v in zip(kept, cells)).rstrip()

    return [line(kept)] + [line([r[c] for c in kept]) for _, r in table.iterrows()]


# ------------------------------------------------------------------ plots
def plot_path(pattern: Path, mode: str) -> Path:
    """`results/leaderboard.png` -> results/leaderboard-<mode>.png; a pattern with {mode} is filled in."""
    text = str(pattern)
    if "{mode}" in text:
        return Path(text.format(mode=mode))
    pattern = Path(pattern)
    return pattern.with_name(f"{pattern.stem}-{mode}{pattern.suffix or '.png'}")


def plot(df: pd.DataFrame, pattern: Path, mode: str | None = None) -> list[Path]:
    """One PNG per mode (or only `mode`): a panel per setting, bars of perplexity (log scale) labelled
    by name or short formula, the dense model and the best hand-made row marked. The paths written."""
    written = []
    for m in [mode] if mode else modes_in(df):
        rows = df[(df["mode"] == m) & df["perplexity"].notna()]
        if len(rows):
            path = plot_path(pattern, m)
            plot_mode(rows, m, path)
            written.append(path)
    return written


def plot_mode(rows: pd.DataFrame, mode: str, path: Path, columns: int = 3) -> None:
    # matplotlib: only --plot draws (seconds to import)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = settings(rows)
    ncols = min(columns, len(panels))
    grid_rows = [panels[i:i + ncols] for i in range(0, len(panels), ncols)]
    slots = [max(len(g) for _, g in row) for row in grid_rows]  # bars of one grid row share a thickness
    heights = [1.2 + 0.22 * n for n in slots]
    fig = plt.figure(figsize=(6.4 * ncols, sum(heights) + 0.6))
    spec = fig.add_gridspec(len(grid_rows), ncols, height_ratios=heights)
    for i, row in enumerate(grid_rows):
        for j, (_, group) in enumerate(row):
            _panel(fig.add_subplot(spec[i, j]), group, slots[i])
    handles = [Patch(color=c, label=k) for k, c in COLORS.items()]
    fig.legend(handles=handles + [Line2D([], [], color="black", linestyle="--", label="dense model")],
               loc="upper right", ncols=len(COLORS) + 1, fontsize=8, frameon=False)
    fig.suptitle(f"prunerzero leaderboard: {mode} mode (test perplexity, log scale; lower is better)",
                 fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (sum(heights) + 0.6)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _color(row, best: bool) -> str:
    if best:
        return COLORS["best hand-made"]
    return COLORS["hand-made" if is_handmade(row["metric"]) else "discovered" if is_discovered(row) else "other"]


def _panel(ax, group: pd.DataFrame, slots: int) -> None:
    """One setting: best at the top, `slots` bar places (its grid row's most) so every bar is as thick."""
    # matplotlib: only --plot draws
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    group = group.sort_values("perplexity")
    dense, mark = _dense(group), best_handmade(group)
    ppl = group["perplexity"].astype(float)
    base = 0.85 * min(dense, ppl.min())
    colors = [_color(r, i == mark) for i, r in group.iterrows()]
    y = [slots - 1 - k for k in range(len(group))]
    ax.barh(y, ppl - base, left=base, color=colors, height=0.7)
    ax.set_yticks(y, [label(r) for _, r in group.iterrows()], fontsize=7)
    ax.set_ylim(-0.6, slots - 0.4)
    for yi, v in zip(y, ppl):
        ax.text(v, yi, f" {v:.1f}", va="center", fontsize=6)
    ax.axvline(dense, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(base, ppl.max() * 1.3)
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    first = group.iloc[0]
    ax.set_title(f"{cut(str(first['budget']), 60)} (dense {dense:.1f})\n{first['model']} | {first['corpus']} | "
                 f"{protocol_short(first['protocol'])}", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
