"""Peak memory of decoding one image, per decode path, for thin images and a normal photo. Prints a Markdown table.

Each cell runs in a fresh Python process: it imports everything, decodes a small warm-up image, records its peak
RSS, decodes the image once and reports the growth of the peak (MB). The model geometry is ViT-B-16's (224,
shortest side, bicubic, centre crop). ``before`` is what the paths did until the crop-box bound: open_clip's
transform on the whole image (CPU ``exact``) and the device resize of the whole image (``decode: device``).

Usage: python benchmarks/bench_decode_memory.py
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGES = {"8000x1": (8000, 1), "4000x1": (4000, 1), "1x8000": (1, 8000), "photo 500x375": (500, 375)}
PATHS = ["cpu-exact", "cpu-fast", "device-fast", "device-exact", "before: open_clip exact", "before: device resize"]

CELL = r'''
import io, json, resource, sys
import numpy as np, torch
import torch.nn.functional as F
from PIL import Image
from clipn_core.device_decode import DeviceDecoder
from clipn_core.images import SplitPreprocessor, image_transform, load_rgb
cfg = {"size": 224, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
       "interpolation": "bicubic", "resize_mode": "shortest"}
path, (w, h) = sys.argv[1], json.loads(sys.argv[2])
def jpeg(w, h):
    rng = np.random.default_rng(0); buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()
def run(data):
    if path in ("cpu-exact", "cpu-fast"):
        return SplitPreprocessor(cfg, mode=path[4:]).decode(data)
    if path.startswith("device"):
        return DeviceDecoder(SplitPreprocessor(cfg, mode=path[7:]), "cpu")([data])
    rgb = load_rgb(data)[0]
    if path == "before: open_clip exact":
        return image_transform(cfg).transforms[1](image_transform(cfg).transforms[0](rgb))
    x = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)[None].float()  # the device resize of the whole image
    s = 224; nw, nh = (s, int(s * rgb.height / rgb.width)) if rgb.width <= rgb.height else (int(s * rgb.width / rgb.height), s)
    return F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)[..., :s, :s].clone()
data = jpeg(w, h)
run(jpeg(300, 200))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(data)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))
'''


def cell(path: str, size: tuple[int, int]) -> float:
    out = subprocess.run([sys.executable, "-c", CELL, path, json.dumps(size)], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    print(f"Peak RSS growth (MB) decoding one image to 224 x 224; {platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs\n")
    print("| image | " + " | ".join(PATHS) + " |")
    print("|---|" + "---:|" * len(PATHS))
    for name, size in IMAGES.items():
        print(f"| {name} | " + " | ".join(f"{cell(p, size):.0f}" for p in PATHS) + " |", flush=True)


if __name__ == "__main__":
    main()
