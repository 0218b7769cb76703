"""Convert the pickled checkpoint of an earlier prunerzero (checkpoint.pkl) into the plain-JSON
checkpoint the current one resumes from (checkpoint.json).

    python experiments/convert_checkpoint.py results/runs/<id> --i-trust-this-file

Unpickling runs whatever code the file names: run this only on a run directory you made yourself
(or otherwise trust). prunerzero never reads a pickle on its own; this script exists for the
campaigns run before checkpoints were JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import pickle
from pathlib import Path

from prunerzero.core.paths import atomic_write_text
from prunerzero.evolve.campaign import CHECKPOINT, CHECKPOINT_VERSION, LEGACY_CHECKPOINT, load_checkpoint


def convert(old: dict) -> dict:
    engine = old["engine"]
    version, internal, gauss = engine["rng"]["python"]
    name, keys, pos, has_gauss, cached = engine["rng"]["numpy"]
    rng = {"python": [version, list(internal), gauss],
           "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
           "torch": base64.b64encode(engine["rng"]["torch"].numpy().tobytes()).decode()}
    return {"version": CHECKPOINT_VERSION, "config": old["config"], "engine": {
        "problem": "metric", "generation": engine["generation"],
        "population": [[f, list(v)] for f, v in engine["population"]],
        "hall_of_fame": [[f, list(v)] for f, v in engine["hall_of_fame"]],
        "logbook": [dict(r) for r in engine["logbook"]], "first_seen": dict(engine["first_seen"]), "rng": rng}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--i-trust-this-file", action="store_true", required=True,
                        help="confirm that the pickle is yours: unpickling runs the code it names")
    args = parser.parse_args(argv)
    old = pickle.loads((args.run_dir / LEGACY_CHECKPOINT).read_bytes())
    atomic_write_text(args.run_dir / CHECKPOINT, json.dumps(convert(old), separators=(",", ":")) + "\n")
    load_checkpoint(args.run_dir)  # validates what was written
    (args.run_dir / LEGACY_CHECKPOINT).unlink()
    print(f"wrote {args.run_dir / CHECKPOINT}; removed {LEGACY_CHECKPOINT}")


if __name__ == "__main__":
    main()
