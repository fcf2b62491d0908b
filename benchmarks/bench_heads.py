"""Class heads on ViT-B-16 (random weights) on this CPU: the full 77-token context against the short-token path
the jobs use, and a second run that loads them from the heads cache. Prints a Markdown table.

The full-context encode of 100 classes x 80 templates x 2 towers would take longer than this whole benchmark
may, so it is measured on a subset (``--before`` classes and twice that); the short-token path on ``--after``
classes and half that. Each row gives ms per text and the 1,000 x 80 figure extrapolated linearly in classes
(each chunk of classes is one forward of the same size, so the cost is linear in the class count). The heads of
the two paths are compared on the subset (max |difference|). The class names are ImageNet's first classes
(the ``imagenet`` set), with the 80 OpenAI ImageNet templates (``openai-imagenet``).

Usage: python benchmarks/bench_heads.py [--before 3] [--after 100] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clipn_core as cc  # noqa: E402
from clipn_core.heads import DEFAULT_HEADS_BATCH  # noqa: E402
from clipn_core.named_sets import CLASS_SETS  # noqa: E402
from clipn_core.prompt_tokens import tokenize_prompts  # noqa: E402
from jobs.scoring_setup import class_heads  # noqa: E402

TARGET_CLASSES = 1000


@torch.no_grad()
def full_context_heads(model, tok, names, templates, batch_size=DEFAULT_HEADS_BATCH):
    """The heads as encoded before the short-token path: every text at the full context (77 tokens), through
    the towers' own forward (``encode_text`` / ``encode_text_no`` in eval mode), in the same chunks."""
    tokens = tokenize_prompts(tok, names, templates, "class")
    per_chunk = max(1, batch_size // len(templates))
    out = {"yes": [], "no": []}
    for start in range(0, len(names), per_chunk):
        chunk = tokens[start:start + per_chunk]
        flat = chunk.reshape(-1, chunk.shape[-1])
        for tower, encode in (("yes", model.encode_text), ("no", model.encode_text_no)):
            f = F.normalize(encode(flat), dim=-1).reshape(len(chunk), len(templates), -1).mean(dim=1)
            out[tower].append(F.normalize(f, dim=-1))
    return torch.cat(out["yes"]), torch.cat(out["no"])


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def row(path, classes, templates, seconds, note=""):
    texts = 2 * classes * templates
    per_text = 1e3 * seconds / texts
    projected = seconds * TARGET_CLASSES / classes
    print(f"| {path} | {classes} x {templates} | {texts:,} | {seconds:.1f} | {per_text:.2f} | "
          f"{projected / 60:.1f} min | {note} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=int, default=3, help="classes of the first full-context row (N; 2N follows)")
    ap.add_argument("--after", type=int, default=100, help="classes of the short-token row (N/2 comes first)")
    ap.add_argument("--architecture", default="ViT-B-16", help="clipn-tiny for a quick check of the script")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = cc.build_clipn(args.architecture, seed=0)
    tok = cc.get_tokenizer(model)
    templates = cc.load_templates("openai-imagenet")
    names = CLASS_SETS["imagenet"].load()
    said = CLASS_SETS["imagenet"].prompts()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"\n## Class heads, {args.architecture} (random weights), {len(templates)} templates, yes and no towers\n")
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{TARGET_CLASSES:,} classes extrapolated linearly\n")
    print("| path | classes x templates | texts | s | ms / text | 1,000 x 80 | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    full_context_heads(model, tok, said[:1], templates[:8])  # one-time costs (allocator, kernels) out of the rows
    full = {}
    for n in (args.before, 2 * args.before):
        full[n], s = timed(lambda n=n: full_context_heads(model, tok, said[:n], templates))
        row("full context (before)", n, len(templates), s)
    with tempfile.TemporaryDirectory() as cache:
        for n in (args.after // 2, args.after):
            heads, s = timed(lambda n=n: class_heads(model, "bench:ViT-B-16:seed0", names[:n], templates,
                                                     said[:n], cache))
            m = 2 * args.before
            diff = max(float((heads.yes[:m] - full[m][0]).abs().max()), float((heads.no[:m] - full[m][1]).abs().max()))
            row("short tokens (after), cache miss", n, len(templates), s,
                f"max abs diff to full context on {m} classes: {diff:.1e}")
        again, s = timed(lambda: class_heads(model, "bench:ViT-B-16:seed0", names[:args.after], templates,
                                             said[:args.after], cache))
        same = torch.equal(again.yes, heads.yes) and torch.equal(again.no, heads.no)
        print(f"| cache hit (second run) | {args.after} x {len(templates)} | 0 | {s:.3f} | - | - | "
              f"bit-identical to the encode: {same} |")
        # a 1,000-class entry: the cache hit the nightly job makes (heads stand in; the load reads the same bytes)
        big = cc.ClassHeads(names, templates, torch.randn(len(names), heads.yes.shape[1]),
                            torch.randn(len(names), heads.yes.shape[1]))
        from clipn_core.heads import heads_cache_key, save_heads
        from jobs.scoring_setup import cache_path

        key = heads_cache_key("bench:big", names, templates, said)
        save_heads(big, cache_path(cache, "heads", key), key)
        loaded, s = timed(lambda: class_heads(model, "bench:big", names, templates, said, cache))
        assert torch.equal(loaded.yes, big.yes)
        print(f"| cache hit, 1,000-class entry | {len(names)} x {len(templates)} | 0 | {s:.3f} | - | - | "
              "entry written with stand-in heads of the real shape |")


if __name__ == "__main__":
    main()
