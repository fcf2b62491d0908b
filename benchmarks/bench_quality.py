"""Quality benchmark: the evaluation table of the demo world at its full size.

Runs the whole demo (world, tiny base CLIP, CLIPN on 2 Ray Train workers, scoring job,
evaluate) and evaluates the same CLIPN with the world's template set (matching the
training captions' styles, ensembled over colours) and with other sets (``--compare``,
by default the short ``default`` set and OpenAI's 80 ImageNet templates). Prints
Markdown tables: per score AUROC and FPR95 (percent, ID positive) for each set over all
OOD images, then near OOD (held-out shapes) and far OOD (noise, gradients, textures)
apart, each against all ID images, then the CTW / ATD decision rates and ID accuracy.

    python benchmarks/bench_quality.py [--out bench_quality_out] [--fresh-clip] [--compare default openai-imagenet]

``--fresh-clip`` ignores a cached base CLIP (the figure then includes its training).
"""

from __future__ import annotations

import argparse
import os
import platform
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
    parser.add_argument("--compare", nargs="+", default=["default", "openai-imagenet"],
                        help="template sets (names or files) to evaluate the same model with besides the world's")
    args = parser.parse_args()

    from jobs.demo import FULL, run_demo

    out = Path(args.out or tempfile.mkdtemp(prefix="clipn-quality-"))
    if args.fresh_clip and (out / "cache").exists():
        shutil.rmtree(out / "cache")
    result = run_demo(out, size=FULL, seed=args.seed, compare_templates=tuple(args.compare))
    reports = {"world": result["evaluation"].model_dump(mode="json")}
    reports.update({t: r.model_dump(mode="json") for t, r in result["template_comparison"].items()})
    world = reports["world"]

    print("\n## Quality on the demo world "
          f"({world['data']['id']} ID + {world['data']['ood']} OOD images, seed {args.seed}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, "
          f"{result['size']['clip_steps']} CLIP steps, {result['size']['clipn_steps']} CLIPN steps, "
          f"logit scale {world['logit_scale']:.1f})\n")
    print("| score | " + " | ".join(f"AUROC, {t} | FPR95, {t}" for t in reports) + " |")
    print("|---|" + "---:|---:|" * len(reports))
    for name in world["scores"]:
        cells = [f"{r['scores'][name]['auroc']:.1f} | {r['scores'][name]['fpr95']:.1f}" for r in reports.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for split in world.get("splits") or {}:
        print(f"\n### {split} OOD only ({world['splits'][split]['ood']} images against the same ID images)\n")
        print("| score | " + " | ".join(f"AUROC, {t} | FPR95, {t}" for t in reports) + " |")
        print("|---|" + "---:|---:|" * len(reports))
        for name in world["scores"]:
            cells = [f"{r['splits'][split]['scores'][name]['auroc']:.1f} | {r['splits'][split]['scores'][name]['fpr95']:.1f}"
                     for r in reports.values()]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| rule | templates | ID flagged OOD (%) | OOD flagged OOD (%) |")
    print("|---|---|---:|---:|")
    for label, rep in reports.items():
        for name, r in rep["decisions"].items():
            print(f"| {name} | {label} | {r['id_flagged_ood']:.1f} | {r['ood_flagged_ood']:.1f} |")
    print("\nID accuracy: " + ", ".join(f"{r['id_accuracy']:.1f}% ({t})" for t, r in reports.items()))
    print(f"whole demo: {result['seconds'] / 60:.1f} min; reports: {out}/report, "
          + ", ".join(f"{out}/report-{Path(t).stem}" for t in result["template_comparison"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
