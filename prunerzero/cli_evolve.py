"""`prunerzero evolve` and `prunerzero export`: a thin face over evolve.campaign and
evolve.export. Mount on the main app with `app.add_typer(evolve_app)` (no name: the commands
join the top level)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prunerzero.console import friendly_errors
from prunerzero.evolve.campaign import resume_campaign, run_campaign
from prunerzero.evolve.config import load_config
from prunerzero.evolve.export import export_run

evolve_app = typer.Typer(no_args_is_help=True)


@evolve_app.command()
@friendly_errors
def evolve(
    config: Optional[Path] = typer.Argument(None, help="campaign config (TOML), e.g. experiments/smoke.toml"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this run directory"),
    backend: Optional[str] = typer.Option(None, "--backend", help="'serial' or 'ray' (overrides the config)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto', 'ray://…'); implies --backend ray"),
    workers: Optional[int] = typer.Option(None, "--workers", help="evaluator actors (overrides the config)"),
    generations: Optional[int] = typer.Option(None, "--generations", min=0,
                                              help="with --resume: run to this many generations (extend a finished campaign)"),
) -> None:
    """Run a metric-discovery campaign, or resume (or extend) one."""
    if (config is None) == (resume is None):
        raise typer.BadParameter("give either a CONFIG or --resume RUN_DIR")
    if generations is not None and resume is None:
        raise typer.BadParameter("--generations extends a run: use it with --resume (a new campaign takes it from its config)")
    changes = {k: v for k, v in {"kind": backend, "address": address, "workers": workers}.items() if v is not None}
    if address is not None and backend is None:
        changes["kind"] = "ray"
    if resume is not None:
        run_dir = resume_campaign(resume, generations=generations, **changes)
    else:
        cfg = load_config(config)
        run_dir = run_campaign(cfg.with_backend(**changes) if changes else cfg)
    typer.echo(f"run directory: {run_dir}")


@evolve_app.command()
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="a campaign's run directory"),
    top: int = typer.Option(5, "--top", min=1, help="how many hall-of-fame entries to export"),
    out: Path = typer.Option(Path("results/metrics"), "--out", help="directory for the files"),
) -> None:
    """Export a run's best metrics as standalone Python modules (allocations as JSON candidate files)."""
    paths = export_run(run_dir, top=top, out_dir=out)
    for p in paths:
        typer.echo(f"{p}  (use as {p}:metric)" if p.suffix == ".py" else f"{p}  (use as {p})")
