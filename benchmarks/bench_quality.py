"""Quality benchmark: the evaluation table of the demo world at its full size.

Runs the whole demo (world, tiny base CLIP, CLIPN on 2 Ray Train workers, scoring job,
evaluate) and evaluates the same CLIPN twice: with the world's template set (matching
the training captions' styles, ensembled over colours) and with the plain ``default``
set. Prints one Markdown table: per score AUROC and FPR95 (percent, ID positive) for
both, then the CTW / ATD decision rates and ID accuracy.

    python benchmarks/bench_quality.py [--out bench_quality_out] [--fresh-clip]

``--fresh-clip`` ignores a cached base CLIP (the figure then includes its training).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--fresh-clip", action="store_true", help="train the base CLIP even if cached")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    args = parser.parse_args()

    from jobs.demo import FULL, run_demo

    out = Path(args.out or tempfile.mkdtemp(prefix="clipn-quality-"))
    if args.fresh_clip and (out / "cache").exists():
        shutil.rmtree(out / "cache")
    result = run_demo(out, size=FULL, seed=args.seed, compare_templates=("default",))
    world = result["evaluation"].model_dump(mode="json")
    plain = result["template_comparison"]["default"].model_dump(mode="json")

    print("\n## Quality on the demo world "
          f"({world['data']['id']} ID + {world['data']['ood']} OOD images, seed {args.seed}, "
          f"{result['size']['clip_steps']} CLIP steps, {result['size']['clipn_steps']} CLIPN steps)\n")
    print("| score | AUROC, world templates | FPR95, world templates | AUROC, default templates | FPR95, default templates |")
    print("|---|---:|---:|---:|---:|")
    for name, m in world["scores"].items():
        p = plain["scores"][name]
        print(f"| {name} | {m['auroc']:.1f} | {m['fpr95']:.1f} | {p['auroc']:.1f} | {p['fpr95']:.1f} |")
    print("\n| rule | templates | ID flagged OOD (%) | OOD flagged OOD (%) |")
    print("|---|---|---:|---:|")
    for label, rep in (("world", world), ("default", plain)):
        for name, r in rep["decisions"].items():
            print(f"| {name} | {label} | {r['id_flagged_ood']:.1f} | {r['ood_flagged_ood']:.1f} |")
    print(f"\nID accuracy: {world['id_accuracy']:.1f}% (world templates), {plain['id_accuracy']:.1f}% (default)")
    print(f"whole demo: {result['seconds'] / 60:.1f} min; reports: {out}/report, {out}/report-default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
