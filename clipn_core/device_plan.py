"""Which encoded images the device decoder takes: a header check, without torch.

Read tasks call :class:`DevicePlan` on every fetched object when the scorer decodes on the
device (``runtime.decode: device``): a plain JPEG it can take travels on encoded, with its
header; anything else is decoded to pixels there, on the read task's CPU, so the scorer
actor's one thread never runs a CPU decoder for it. Imports Pillow only: decode workers
never load torch.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from .images import DEFAULT_MAX_PIXELS, SplitPreprocessor, allow_pillow, ends_early, resized_limit

_EXIF_ORIENTATION = 0x0112


def plain_jpeg(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation 1-8) of a JPEG the device decoder can take (JFIF/EXIF, RGB or greyscale,
    within ``max_pixels``, not cut short), else None; never raises."""
    if data[:3] != b"\xff\xd8\xff" or ends_early(data):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            allow_pillow(max_pixels)
            img = Image.open(io.BytesIO(data))
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.width * img.height > max_pixels:
                return None
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - anything odd goes to the CPU decoder, which types the error
        return None
    return img.width, img.height, orientation if 1 <= orientation <= 8 else 1


def shortest_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) of a ``width`` x ``height`` image with its shortest side resized to ``side`` (torchvision's
    rounding)."""
    return (side, int(side * height / width)) if width <= height else (int(side * width / height), side)


class DevicePlan:
    """Decides, per encoded image, whether the device decoder takes it (:meth:`header`).

    ``decodes_on_device``: whether any image can be (fast mode, shortest-side square geometry, a bicubic or
    bilinear filter); when False :meth:`header` is always None and every image takes the CPU path."""

    def __init__(self, pre: SplitPreprocessor, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.decodes_on_device = pre.fast and pre.interpolation in ("bicubic", "bilinear")
        self.side = pre.size[0]
        self.max_pixels = max_pixels

    def header(self, data: bytes) -> tuple[int, int, int] | None:
        """(width, height, EXIF orientation) when the device decodes ``data``, else None (the CPU decodes it).

        None also for an image so long and thin that its device resize would outgrow
        :func:`~clipn_core.images.resized_limit` (8,000 x 1 would be 224 x 1.8 million floats): the CPU path
        resamples only the crop box."""
        if not self.decodes_on_device:
            return None
        found = plain_jpeg(data, self.max_pixels)
        if found is None:
            return None
        w, h, _ = found
        new_w, new_h = shortest_side_size(w, h, self.side)
        return found if new_w * new_h <= resized_limit(w, h, (self.side, self.side)) else None
