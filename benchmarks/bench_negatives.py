"""Negative labels on the demo world: MCM, ATD, NegLabel and the fused candidates, and how they move with M and
the near-synonym bound. Prints Markdown tables.

Runs the full demo (its tiny base CLIP is cached under ``--cache-dir``), then scores the demo's labelled
ID/OOD evaluation set once and re-scores its image features with negative labels mined at each setting.
Fused candidates (both use the no tower and the negatives):

* ``clipn_neg`` (registered): ATD whose class softmax also holds the negative labels;
* ``neglabel_no``: NegLabel whose denominator also holds the ID classes' no-tower logits.

Usage: python benchmarks/bench_negatives.py [--out bench_negatives_out] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import clipn_core as cc  # noqa: E402
from clipn_core.images import split_preprocessor  # noqa: E402
from clipn_core.metrics import ood_metrics  # noqa: E402
from clipn_core.negatives import load_lexicon, mine_negatives  # noqa: E402
from clipn_core.scores import ScoreInputs, compute_scores  # noqa: E402
from clipn_core.storage import local_copy  # noqa: E402

COUNTS = (100, 1000, 3000, 10000)
BOUNDS = (0.8, 0.85, 0.9, 0.95, 1.0)


def neglabel_no(x: ScoreInputs) -> np.ndarray:
    """Candidate: NegLabel with the ID classes' no-tower logits among the negatives of every group."""
    id_lse = torch.logsumexp(x.logits_yes, dim=-1, keepdim=True)
    no_lse = torch.logsumexp(x.logits_no, dim=-1, keepdim=True)
    neg = torch.logaddexp(x.negative_group_lse, no_lse)
    return torch.sigmoid(id_lse - neg).mean(dim=-1).numpy()


def metrics(score: np.ndarray, is_id: np.ndarray) -> tuple[float, float]:
    m = ood_metrics(score[is_id], score[~is_id])
    return m.auroc, m.fpr95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_negatives_out")
    ap.add_argument("--cache-dir", default=None, help="cache of the demo's tiny base CLIP (default: <out>/cache)")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from jobs.demo import FULL, run_demo
    from tests.fault_proxy import start_moto_process

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    server, endpoint = start_moto_process()  # outlives the demo, so its checkpoint and eval set stay readable
    try:
        out = Path(args.out)
        result = run_demo(out, endpoint=endpoint, size=FULL, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        storage = {"client_kwargs": {"endpoint_url": endpoint}}
        cfg = result["configs"]["evaluate"]
        model, _, _ = cc.load_checkpoint(cfg.model.checkpoint, storage)
        table = pq.read_table(local_copy(cfg.data.uri, storage, out / "cache"))
    finally:
        server.terminate()
    classes = tuple(cfg.classes.names)
    tok = cc.get_tokenizer(model)
    heads = cc.build_class_heads(model, tok, classes, cc.load_templates(cfg.templates))
    pre = split_preprocessor(model.preprocess_cfg, mode="fast")
    pixels = torch.from_numpy(np.stack([pre.decode(b) for b in table["image"].to_pylist()]))
    is_id = np.array(table["is_id"].to_pylist())
    with torch.no_grad():
        features = model.encode_image(pre.normalize(pixels), normalize=True)
    scale = model.logit_scale
    lexicon = load_lexicon()

    def scores(negatives) -> dict[str, np.ndarray]:
        x = ScoreInputs(features, heads.yes, heads.no, scale, negatives=None if negatives is None else negatives.yes)
        out = {k: v.id_score.numpy() for k, v in compute_scores(x).items()}
        if negatives is not None:
            out["neglabel_no"] = neglabel_no(x)
        return out

    base = scores(None)
    default = mine_negatives(model, tok, heads, lexicon, 10_000, 0.9)
    main_scores = {**base, **scores(default)}
    print(f"\n## Negative labels on the demo world ({int(is_id.sum())} ID + {int((~is_id).sum())} OOD, logit scale "
          f"{scale:.1f}, lexicon {len(lexicon)} words, M = {len(default)}, bound 0.9, "
          f"{default.settings['dropped_as_synonyms']} near-synonyms dropped)\n")
    print("| score | AUROC | FPR95 |\n|---|---:|---:|")
    for name in ("mcm", "atd", "neglabel", "clipn_neg", "neglabel_no"):
        auroc, fpr = metrics(main_scores[name], is_id)
        print(f"| {name} | {auroc:.2f} | {fpr:.2f} |")
    held_out = {"diamond", "ring", "hexagon"}
    print(f"\nheld-out shape words among the negatives: {sorted(held_out & set(default.words))}")

    print("\n## Sensitivity (AUROC / FPR95)\n")
    print("| M | bound | neglabel | clipn_neg | neglabel_no |\n|---:|---:|---|---|---|")
    for count in COUNTS:
        for bound in BOUNDS:
            negatives = mine_negatives(model, tok, heads, lexicon, count, bound)
            s = scores(negatives)
            cells = [f"{a:.2f} / {f:.2f}" for a, f in (metrics(s[n], is_id) for n in ("neglabel", "clipn_neg", "neglabel_no"))]
            print(f"| {len(negatives)} | {bound} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
