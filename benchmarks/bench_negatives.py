"""Negative labels and the lake bank on the demo world, near and far OOD apart: every registered score, the
lake bank's OOD-proxy rule before and after it needed evidence, and the fused candidates. Prints Markdown tables.

Runs the full demo (its tiny base CLIP is cached under ``--cache-dir``), then scores the demo's labelled
ID / near / far evaluation set once and re-scores its image features (metrics: that split's OOD images
against all ID images, as ``clipn evaluate``'s ``data.split_column``). Lake banks, each built from a night's
``ok`` rows (embeddings, ATD scores, ATD's threshold-free flags):

* ``lake night``: the demo's first night (1,000 lake images, 3 of 8 shapes held out: near OOD only);
* ``ID-only night``: the demo's 1,000-image ID calibration sample scored as a night (no OOD at all);
* rule ``tenth`` (the rule before issue 22): OOD proxies the lowest-ATD tenth whatever the night holds, ID
  proxies the highest tenth; rule ``evidence`` (registered, :func:`clipn_core.lake_bank.build_bank`, default
  settings): the lowest tenth only where ATD's rule flags OOD, and only when the flagged rows' purity bound
  ``1 - p n / f`` reaches ``min_purity`` (p: the share of the ID calibration sample ATD's rule flags,
  computed here as ``clipn calibrate`` records it), the highest tenth only where it does not flag;
  ``evidence, min 4 rows`` (tried first): the same with ``min_purity`` 0 (a floor of 4 rows only);
* fusion ``x S_img`` (registered) or ``x (0.5 + 0.5 S_img)`` (tried: a bound on the bank's effect).

Fused candidates that are not registered: ``neglabel_no`` (NegLabel whose denominator also holds the ID
classes' no-tower logits) and ``atd_lake`` (ATD times the bank's S_img, no negative labels).

Usage: python benchmarks/bench_negatives.py [--out bench_negatives_out] [--cache-dir DIR] [--reuse] [--sensitivity]

``--reuse`` skips the demo and reads the features a previous run saved in ``<out>/features.npz``;
``--sensitivity`` adds the M / near-synonym-bound sweep (mines 20 times).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from clipn_core.lake_bank import Evidence, build_bank  # noqa: E402
from clipn_core.metrics import ood_metrics  # noqa: E402
from clipn_core.scores import ScoreInputs, compute_scores  # noqa: E402
from schemas.score_config import LakeBankConfig  # noqa: E402

COUNTS = (100, 1000, 3000, 10000)
BOUNDS = (0.8, 0.85, 0.9, 0.95, 1.0)
SPLITS = ("near", "far")
BANK = LakeBankConfig()  # the job's defaults


def neglabel_no(x: ScoreInputs) -> np.ndarray:
    """Candidate: NegLabel with the ID classes' no-tower logits among the negatives of every group."""
    id_lse = torch.logsumexp(x.logits_yes, dim=-1, keepdim=True)
    no_lse = torch.logsumexp(x.logits_no, dim=-1, keepdim=True)
    neg = torch.logaddexp(x.negative_group_lse, no_lse)
    return torch.sigmoid(id_lse - neg).mean(dim=-1).numpy()


def tenth_bank(features: np.ndarray, atd: np.ndarray, uris: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank rule before issue 22 (baseline): OOD proxies the lowest-ATD tenth, ID the highest, whatever they are."""
    from sklearn.cluster import KMeans

    order = np.argsort(np.asarray(uris, dtype=object), kind="stable")
    feats, scores = features[order], atd[order]
    low, high = np.quantile(scores, BANK.quantile), np.quantile(scores, 1 - BANK.quantile)

    def centroids(rows):
        km = KMeans(n_clusters=max(1, min(BANK.clusters, len(rows) // 4)), n_init=1, random_state=0).fit(rows)
        return torch.nn.functional.normalize(torch.from_numpy(km.cluster_centers_.astype(np.float32)), dim=-1)

    return centroids(feats[scores >= high]), centroids(feats[scores <= low])


def split_metrics(score: np.ndarray, is_id: np.ndarray, split: np.ndarray) -> list[tuple[float, float]]:
    out = []
    for name in SPLITS:
        m = ood_metrics(score[is_id], score[split == name])
        out.append((m.auroc, m.fpr95))
    return out


def collect(args, out: Path) -> dict:
    """Run the demo and save what the tables need (features, heads, negatives, the first night's rows)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    import clipn_core as cc
    from clipn_core.images import split_preprocessor
    from clipn_core.negatives import load_lexicon, mine_negatives
    from clipn_core.storage import local_copy
    from jobs.demo import FULL, run_demo
    from jobs.demo.job import DEMO_NIGHT
    from tests.fault_proxy import start_moto_process

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    server, endpoint = start_moto_process()  # outlives the demo, so its checkpoint and labelled sets stay readable
    try:
        result = run_demo(out, endpoint=endpoint, size=FULL, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        storage = {"client_kwargs": {"endpoint_url": endpoint}}
        cfg = result["configs"]["evaluate"]
        model, _, _ = cc.load_checkpoint(cfg.model.checkpoint, storage)
        table = pq.read_table(local_copy(cfg.data.uri, storage, out / "cache"))
        calib = pq.read_table(local_copy(result["configs"]["calibrate"].data.uri, storage, out / "cache"))
    finally:
        server.terminate()
    tok = cc.get_tokenizer(model)
    heads = cc.build_class_heads(model, tok, tuple(cfg.classes.names), cc.load_templates(cfg.templates))
    pre = split_preprocessor(model.preprocess_cfg, mode="fast")

    def encode(images: list[bytes]) -> np.ndarray:
        pixels = torch.from_numpy(np.stack([pre.decode(b) for b in images]))
        with torch.no_grad():
            return model.encode_image(pre.normalize(pixels), normalize=True).numpy()

    negatives = mine_negatives(model, tok, heads, load_lexicon(), 10_000, 0.9)
    night = pads.dataset(str(out / "scores" / f"run_date={DEMO_NIGHT}"), format="parquet").to_table(
        columns=["uri", "status", "score_atd", "ood_atd", "embedding"]).filter(pads.field("status") == "ok")
    saved = {
        "eval_features": encode(table["image"].to_pylist()), "is_id": np.array(table["is_id"].to_pylist()),
        "split": np.array(table["split"].to_pylist()), "calib_features": encode(calib["image"].to_pylist()),
        "night_features": np.stack([np.asarray(e, np.float32) for e in night["embedding"].to_pylist()]),
        "night_uris": np.array(night["uri"].to_pylist()), "heads_yes": heads.yes.detach().numpy(),
        "heads_no": heads.no.detach().numpy(), "negatives": negatives.yes.detach().numpy(),
        "logit_scale": np.float32(model.logit_scale),
        "dropped": np.int64(negatives.settings["dropped_as_synonyms"]),
    }
    np.savez(out / "features.npz", **saved)
    if args.sensitivity:
        sensitivity(model, tok, heads, load_lexicon(), saved)
    return saved


def sensitivity(model, tok, heads, lexicon, d) -> None:
    from clipn_core.negatives import mine_negatives

    feats = torch.from_numpy(d["eval_features"])
    is_id, split = d["is_id"], d["split"]
    print("\n## Sensitivity to M and the near-synonym bound (AUROC / FPR95, near | far)\n")
    print("| M | bound | neglabel | clipn_neg | neglabel_no |\n|---:|---:|---|---|---|")
    for count in COUNTS:
        for bound in BOUNDS:
            negatives = mine_negatives(model, tok, heads, lexicon, count, bound)
            x = ScoreInputs(feats, heads.yes, heads.no, float(d["logit_scale"]), negatives=negatives.yes)
            s = {k: v.id_score.numpy() for k, v in compute_scores(x, ["neglabel", "clipn_neg"]).items()}
            s["neglabel_no"] = neglabel_no(x)
            cells = [" | ".join(f"{a:.2f} / {f:.2f}" for a, f in split_metrics(s[n], is_id, split)).replace(" | ", " ; ")
                     for n in ("neglabel", "clipn_neg", "neglabel_no")]
            print(f"| {len(negatives)} | {bound} | {' | '.join(cells)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_negatives_out")
    ap.add_argument("--cache-dir", default=None, help="cache of the demo's tiny base CLIP (default: <out>/cache)")
    ap.add_argument("--reuse", action="store_true", help="read <out>/features.npz instead of running the demo")
    ap.add_argument("--sensitivity", action="store_true", help="also sweep M and the near-synonym bound")
    args = ap.parse_args()
    out = Path(args.out)
    d = dict(np.load(out / "features.npz")) if args.reuse else collect(args, out)

    scale = float(d["logit_scale"])
    yes, no, neg = (torch.from_numpy(d[k]) for k in ("heads_yes", "heads_no", "negatives"))
    is_id, split = d["is_id"], d["split"]

    def inputs(features: np.ndarray, bank=None) -> ScoreInputs:
        return ScoreInputs(torch.from_numpy(features), yes, no, scale, negatives=neg, bank=bank)

    # the evidence's ID flag rate, as clipn calibrate records it: the share of the ID calibration sample ATD's
    # rule flags (the ID-only night below is that very sample)
    p_atd = float(compute_scores(inputs(d["calib_features"]), ["atd"])["atd"].is_ood.float().mean())
    evidence = Evidence("ood_atd", p_atd, "calibration sample", len(d["calib_features"]))
    settings = dict(quantile=BANK.quantile, clusters=BANK.clusters, min_ood_rows=BANK.min_ood_rows)

    def night_bank(features: np.ndarray, uris: list[str]):
        """The rules' banks from a night's rows, with ATD's scores and flags computed here (as the job does)."""
        atd = compute_scores(inputs(features), ["atd"])["atd"]
        score, flags = atd.id_score.numpy().astype(np.float64), atd.is_ood.numpy()
        return {"tenth": tenth_bank(features, score, uris),
                "evidence": build_bank(features, score, flags, uris, evidence, min_purity=BANK.min_purity, **settings),
                "evidence, min 4 rows": build_bank(features, score, flags, uris, evidence, min_purity=0.0, **settings)
                }, int(flags.sum())

    nights = {"lake night": (d["night_features"], [str(u) for u in d["night_uris"]]),
              "ID-only night": (d["calib_features"], [f"calib/{i:05d}" for i in range(len(d["calib_features"]))])}
    x = inputs(d["eval_features"])
    rows = {name if name != "clipn_neg_lake" else "clipn_neg_lake, no bank (= clipn_neg)": r.id_score.numpy()
            for name, r in compute_scores(x).items()}
    rows["neglabel_no (candidate)"] = neglabel_no(x)
    notes = []
    for night, (features, uris) in nights.items():
        banks, flagged = night_bank(features, uris)
        tenth = banks.pop("tenth")
        notes.append(f"{night}: {len(features)} rows, {flagged} flagged OOD by ATD's rule (p = {p_atd:.3f} on the "
                     f"ID calibration sample); rule tenth: "
                     f"{len(tenth[0])} ID + {len(tenth[1])} OOD proxies; "
                     + "; ".join(f"rule {r}: {b.meta['id_proxies']} ID + {b.meta['ood_proxies']} OOD proxies"
                                 + (f" (empty: {b.meta['empty']})" if b.meta.get("empty") else "")
                                 for r, b in banks.items()))
        banks = {"tenth": tenth, **{r: None if b.empty else (b.id_proxies, b.ood_proxies) for r, b in banks.items()}}
        for rule, bank in banks.items():
            xb = inputs(d["eval_features"], bank)
            neg_score = compute_scores(xb, ["clipn_neg"])["clipn_neg"].id_score
            share = xb.bank_id_share
            rows[f"clipn_neg_lake, {night}, rule {rule}" + (" (registered)" if rule == "evidence" else "")] = \
                compute_scores(xb, ["clipn_neg_lake"])["clipn_neg_lake"].id_score.numpy()
            rows[f"clipn_neg_lake, {night}, rule {rule}, x (0.5 + 0.5 S_img) (tried)"] = \
                (neg_score * (0.5 + 0.5 * share)).numpy()
            if night == "lake night" and rule == "evidence":
                atd = compute_scores(xb, ["atd"])["atd"].id_score
                rows[f"atd_lake (candidate), {night}, rule {rule}"] = (atd * share).numpy()

    counts = ", ".join(f"{int((split == s).sum())} {s}" for s in SPLITS)
    print(f"\n## Every score on the demo world, near and far OOD apart ({int(is_id.sum())} ID; OOD: {counts}; logit "
          f"scale {scale:.1f}; M = {len(neg)} negative labels, bound 0.9, {int(d['dropped'])} near-synonyms dropped; "
          f"{platform.node()}, {os.cpu_count()} CPUs)\n")
    print("| score | near AUROC | near FPR95 | far AUROC | far FPR95 |\n|---|---:|---:|---:|---:|")
    for name, score in rows.items():
        (na, nf), (fa, ff) = split_metrics(score, is_id, split)
        print(f"| {name} | {na:.2f} | {nf:.2f} | {fa:.2f} | {ff:.2f} |")
    print("\nBanks:\n" + "\n".join(f"- {n}" for n in notes))

    from jobs.demo.world import FAR_KINDS, World

    # the far rows are the labelled set's last ones, in World.far_samples order (the demo's world, seed 0)
    kinds = np.array([""] * int((split != "far").sum()) + [s.shape for s in World().far_samples("eval-far", int((split == "far").sum()))])
    print("\n## Far OOD by kind (AUROC against all ID images; ATD's rule: share of the kind it flags)\n")
    print("| kind | images | msp | mcm | atd | clipn_neg | ATD flags (%) |\n|---|---:|---:|---:|---:|---:|---:|")
    atd_flags = compute_scores(x, ["atd"])["atd"].is_ood.numpy()
    for kind in FAR_KINDS:
        m = kinds == kind
        cells = " | ".join(f"{ood_metrics(rows[n][is_id], rows[n][m]).auroc:.1f}" for n in ("msp", "mcm", "atd", "clipn_neg"))
        print(f"| {kind} | {int(m.sum())} | {cells} | {100 * atd_flags[m].mean():.0f} |")


if __name__ == "__main__":
    main()
