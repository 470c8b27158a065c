"""Write the demo's sample scenes (``assets/samples``): held-out scenes past the benchmark's questions.

    python scripts/make_samples.py assets/samples

Each scene is saved as ``scene-XX.png`` and its questions (every category the scene supports) as
``questions.json`` records ``{"image", "question", "answer", "category", "seed"}``. Not installed with
the package: it made the shipped samples once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from vtoken.eval.scenes import make_scene, questions_for, scene_seed


def save_samples(folder: str | Path, n: int = 6, first: int = 10**6) -> list[dict[str, Any]]:
    """Write ``n`` held-out scenes from seed index ``first`` on (past the benchmark's questions)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for i in range(n):
        seed = scene_seed("heldout", first + i)
        image, scene = make_scene(seed)
        name = f"scene-{i + 1:02d}.png"
        image.save(folder / name, optimize=True)
        for item in questions_for(scene, np.random.default_rng([seed, 17])):
            records.append({"image": name, **item, "seed": seed})
    (folder / "questions.json").write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the scenes and questions.json")
    parser.add_argument("-n", type=int, default=6, help="number of scenes (default: %(default)s)")
    args = parser.parse_args()
    save_samples(args.folder, args.n)
