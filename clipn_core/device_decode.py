"""Batched JPEG decoding and resizing on the scoring device (nvJPEG on CUDA), with a CPU fallback.

:class:`DeviceDecoder` turns a batch of encoded images into the model's uint8 input
[N, 3, H, W] on the scoring device. With ``fast`` preprocessing and open_clip's usual
geometry (``resize_mode: shortest``, a square size), plain JPEGs (JFIF/EXIF, RGB or
greyscale, within ``max_pixels``, not cut short) are decoded in one
``torchvision.io.decode_jpeg`` call on the device; EXIF orientation is applied there with
flips and transposes, as the CPU decoder applies it; the shortest side is resized with the
model's filter (antialiased) and centre-cropped as open_clip does, within 2 grey levels of
``exact``. Everything else (other formats, CMYK JPEGs, truncated files, a decoder failure, images so long and thin
that the resized image would outgrow :func:`~clipn_core.images.resized_limit`)
goes through :class:`~clipn_core.images.SplitPreprocessor.decode` on the CPU, so every
input gets the same typed status as in CPU decoding. With ``exact`` preprocessing (or a
geometry the device resize does not implement, such as ``squash``) every image takes that
CPU path: exact pixels need open_clip's own Pillow resampling. On a CPU device the same
code runs with libjpeg, which is how the tests exercise it.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .device_plan import DevicePlan, shortest_side_size
from .images import DEFAULT_MAX_PIXELS, DecodeError, SplitPreprocessor

_MAX_CHUNK_PIXELS = 256_000_000  # decoded pixels held on the device at once (~768 MB of uint8 RGB)
# pixels of one resize call: its float32 copy (x 4 bytes x 3 channels) stays ~768 MB however many photos share a size
_MAX_RESIZE_PIXELS = 64_000_000


@dataclass(frozen=True)
class DeviceBatch:
    """Decoded batch: ``pixels`` uint8 [K, 3, H, W] on the device for the rows in ``rows`` (indices into
    the input list, in order), and ``errors[i]`` (a :class:`DecodeError`) for every input that failed."""

    pixels: torch.Tensor
    rows: list[int]
    errors: dict[int, DecodeError]
    on_device: int  # how many of ``rows`` the device decoder handled (the rest: CPU fallback)


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF ``orientation`` (1-8) to an image tensor [C, H, W], as Pillow's ``exif_transpose`` does."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1, -2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, dims=(-2, -1))
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(x, 1, dims=(-2, -1))
    return x


class DeviceDecoder:
    """Decode + resize + centre-crop batches of encoded images on ``device`` (module docstring).

    ``pre`` supplies the target size, the resize filter and the CPU path (its ``mode``, fast
    or exact, applies to the images decoded there). ``decodes_on_device``: whether any image
    can be decoded on the device (fast mode, shortest-side square geometry, a bicubic or
    bilinear filter); when False every image takes the CPU path.
    """

    def __init__(self, pre: SplitPreprocessor, device: str | torch.device, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.pre = pre
        self.plan = DevicePlan(pre, max_pixels)
        self.decodes_on_device = self.plan.decodes_on_device
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.side = pre.size[0]
        self.mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
        # images per resize call: a GPU takes a whole group of equal sizes at once; on a CPU the float copy of a
        # large group outgrows the caches (256 images of 320 x 240: 2.2 ms per image against 0.9 in groups of 8)
        self.resize_group = 8 if self.device.type == "cpu" else 1 << 30

    def resize_crop(self, images: list[torch.Tensor]) -> torch.Tensor:
        """G images uint8 [3, h, w] of one size -> uint8 [G, 3, side, side]: shortest side to ``side``
        (antialiased), centre crop; one resize call for the group."""
        h, w = images[0].shape[-2:]
        side = self.side
        new_w, new_h = shortest_side_size(w, h, side)
        y = torch.stack(images).float()
        if (new_h, new_w) != (h, w):
            y = F.interpolate(y, size=(new_h, new_w), mode=self.mode, antialias=True, align_corners=False)
        top, left = int(round((new_h - side) / 2.0)), int(round((new_w - side) / 2.0))
        return y[:, :, top:top + side, left:left + side].round_().clamp_(0, 255).to(torch.uint8)

    def _decoded_chunks(self, datas: list[bytes], headers: np.ndarray):
        """Device decode in chunks of at most ``_MAX_CHUNK_PIXELS`` decoded pixels: yields (index of the chunk's
        first image, its images oriented uint8 [3, h, w], None for one the decoder refuses). The caller resizes a
        chunk before asking for the next, so the full-size images of one chunk at most are held at once."""
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg

        def decode_jpeg(data, **kw):
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec (README, "Decoding on the GPU")
                warnings.simplefilter("ignore", DeprecationWarning)
                return tv_decode_jpeg(data, **kw)

        sizes = (headers[:, 0].astype(np.int64) * headers[:, 1]).tolist()
        start = 0
        while start < len(datas):
            if start and self.device.type == "cuda":
                # nvJPEG writes on its own stream into tensors allocated on this one, waiting for nothing queued
                # here: the previous chunk's resize must be done before its freed memory can be decoded into
                torch.cuda.current_stream(self.device).synchronize()
            end, pixels = start, 0
            while end < len(datas) and (end == start or pixels + sizes[end] <= _MAX_CHUNK_PIXELS):
                pixels += sizes[end]
                end += 1
            encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas[start:end]]
            try:
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except Exception:  # noqa: BLE001 - one bad image fails the whole call: retry one by one
                decoded = []
                for e in encoded:
                    try:
                        decoded.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=self.device))
                    except Exception:  # noqa: BLE001 - the CPU decoder will type this image's error
                        decoded.append(None)
            out = []
            for (width, height, orientation), x in zip(headers[start:end].tolist(), decoded):
                ok = x is not None and tuple(x.shape[-2:]) == (height, width)
                out.append(orient(x, orientation) if ok else None)
            yield start, out
            decoded = out = encoded = None  # the chunk's full-size images go before the next chunk is decoded
            start = end

    def decode_planned(self, datas: list[bytes], headers: np.ndarray) -> DeviceBatch:
        """Decode JPEGs that :class:`~clipn_core.device_plan.DevicePlan` passed (``headers`` int [N, 3]: width,
        height, EXIF orientation) on the device, a chunk of bounded decoded size at a time; within a chunk,
        images of one decoded size are resized together, at most ``resize_group`` images and
        ``_MAX_RESIZE_PIXELS`` pixels per call, so device memory stays bounded whatever the batch. One the
        decoder refuses after all takes the CPU path, so it keeps the CPU decoder's status."""
        n = len(datas)
        parts: list[torch.Tensor] = []
        order: list[int] = []
        fallback: list[int] = []
        for first, decoded in (self._decoded_chunks(datas, np.asarray(headers).reshape(n, 3)) if n else ()):
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            for j, x in enumerate(decoded):
                if x is None:
                    fallback.append(first + j)
                else:
                    groups[tuple(x.shape[-2:])].append(j)
            for (h, w), rows in groups.items():
                step = max(1, min(self.resize_group, _MAX_RESIZE_PIXELS // (h * w)))
                for k in range(0, len(rows), step):
                    parts.append(self.resize_crop([decoded[j] for j in rows[k:k + step]]))
                    order.extend(first + j for j in rows[k:k + step])
            del decoded  # this chunk's full-size images go before the next chunk is decoded
        errors: dict[int, DecodeError] = {}
        for i in fallback:
            out = self.pre.decode(datas[i], self.max_pixels)
            if isinstance(out, DecodeError):
                errors[i] = out
            else:
                parts.append(torch.from_numpy(out)[None].to(self.device))
                order.append(i)
        if not parts:
            return DeviceBatch(torch.zeros((0, 3, *self.pre.size), dtype=torch.uint8, device=self.device),
                               [], errors, 0)
        pixels = parts[0] if len(parts) == 1 else torch.cat(parts)
        rows = sorted(order)
        if order != rows:  # mixed sizes or a fallback: back to input order
            pixels = pixels[torch.from_numpy(np.argsort(order, kind="stable")).to(self.device)]
        return DeviceBatch(pixels, rows, errors, n - len(fallback))

    def __call__(self, datas: list[bytes]) -> DeviceBatch:
        """Decode every item of ``datas``; failures come back as typed errors, never raised. Plain JPEGs go to
        :meth:`decode_planned`, everything else (module docstring) through the CPU decoder."""
        headers = [self.plan.header(d) for d in datas]
        device_rows = [i for i, h in enumerate(headers) if h is not None]
        planned = self.decode_planned([datas[i] for i in device_rows],
                                      np.array([headers[i] for i in device_rows], dtype=np.int64).reshape(-1, 3))
        decoded = {device_rows[j]: planned.pixels[k] for k, j in enumerate(planned.rows)}
        errors = {device_rows[j]: e for j, e in planned.errors.items()}
        for i, data in enumerate(datas):
            if i in decoded or i in errors or headers[i] is not None:
                continue
            out = self.pre.decode(data, self.max_pixels)
            if isinstance(out, DecodeError):
                errors[i] = out
            else:
                decoded[i] = torch.from_numpy(out).to(self.device)
        rows = sorted(decoded)
        pixels = (torch.stack([decoded[i] for i in rows]) if rows
                  else torch.zeros((0, 3, self.side, self.side), dtype=torch.uint8, device=self.device))
        return DeviceBatch(pixels, rows, errors, planned.on_device)
