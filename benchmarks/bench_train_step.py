"""One training step's forward + backward on this CPU: open_clip's full-context text towers against the trimmed
tokens the training stages use (the text towers run on the tokens up to the batch's longest caption). Prints a
Markdown table.

Each stage's own module is timed against its baseline in the same run, on the same batch of the demo world's
captions (``--batch`` pairs), in one process with ``--threads`` torch threads:

* clip stage: ``ContrastiveCLIP`` against the CLIP's own ``forward`` (both towers train);
* clipn stage: ``CLIPN.forward`` (frozen image and yes towers without gradients, the no tower trained) against the
  same computation on the full context.

Steady state: after 3 warm-up steps, ``--steps`` steps and twice that, ms per step from each. The loss is the clip
stage's contrastive loss / a sum over the no-tower features (the backward's cost, not the loss, is measured).

Usage: python benchmarks/bench_train_step.py [--arch clipn-tiny] [--batch 128] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clipn_core as cc  # noqa: E402
from clipn_core.losses import clip_contrastive_loss  # noqa: E402
from clipn_core.model import text_features, trim_tokens  # noqa: E402
from clipn_core.training import ContrastiveCLIP  # noqa: E402
from clipn_core.weights import create_base_clip  # noqa: E402
from jobs.demo.world import World  # noqa: E402


def ms_per_step(step, steps: int) -> float:
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="clipn-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    clip, _, _ = create_base_clip(args.arch, seed=0)
    clip.train()
    context = int(clip.positional_embedding.shape[0])
    captions = World(seed=0).pairs_table(args.batch).column("caption").to_pylist()
    tokens = open_clip.SimpleTokenizer(context_length=context)(captions)
    used = trim_tokens(tokens, clip, clip.text_pool_type).shape[1]
    size = int(clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size)
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    wrapped = ContrastiveCLIP(clip)

    def clip_step(module):
        def step():
            clip.zero_grad(set_to_none=True)
            f, g, s = module(images, tokens)[:3]
            clip_contrastive_loss(f, g, s).backward()
        return step

    model = cc.CLIPN(create_base_clip(args.arch, seed=0)[0], num_prompts=4).train()
    no = model.no_tower
    idx = torch.arange(args.batch) % (no.num_prompts + 1)

    def clipn_full():
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.encode_image(images), model.clip.encode_text(tokens, normalize=True)
        x = text_features(no, tokens, no.pool_type, no.eos_id, no.prompt_for_batch(args.batch, idx))
        F.normalize(x, dim=-1).sum().backward()

    def clipn_trimmed():
        model.zero_grad(set_to_none=True)
        model(images, tokens, prompt_idx=idx)[2].sum().backward()

    rows = [("clip stage", "open_clip CLIP.forward (full context)", clip_step(clip)),
            ("clip stage", "ContrastiveCLIP (trimmed)", clip_step(wrapped)),
            ("clipn stage", "no tower on the full context", clipn_full),
            ("clipn stage", "CLIPN.forward (trimmed)", clipn_trimmed)]
    print(f"{args.arch}, batch {args.batch}, context {context}, captions up to {used} tokens (the demo world's), "
          f"{args.threads} torch thread(s), torch {torch.__version__}, {platform.node()} ({platform.machine()})\n")
    print(f"| stage | forward | ms/step ({args.steps} steps) | ms/step ({2 * args.steps} steps) |")
    print("|---|---|---:|---:|")
    for stage, name, step in rows:
        print(f"| {stage} | {name} | {ms_per_step(step, args.steps):.1f} | {ms_per_step(step, 2 * args.steps):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
