"""Metric discovery: DEAP genetic programming over W, G, X with Opposing Operation
Simplification, resumable campaigns on a serial or Ray backend, and export.

    from prunerzero.evolve import load_config, run_campaign, resume_campaign, export_run
    run_dir = run_campaign(load_config("experiments/smoke.toml"))
    export_run(run_dir, top=5, out_dir="results/metrics")
"""

from .campaign import resume_campaign, run_campaign
from .config import CampaignConfig, ConfigError, load_config
from .export import export_run

__all__ = ["CampaignConfig", "ConfigError", "export_run", "load_config", "resume_campaign", "run_campaign"]
