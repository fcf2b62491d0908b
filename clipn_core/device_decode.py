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

import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .images import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    SplitPreprocessor,
    allow_pillow,
    ends_early,
    resized_limit,
)

_EXIF_ORIENTATION = 0x0112
_MAX_CHUNK_PIXELS = 256_000_000  # decoded pixels held on the device at once (~768 MB of uint8 RGB)


@dataclass(frozen=True)
class DeviceBatch:
    """Decoded batch: ``pixels`` uint8 [K, 3, H, W] on the device for the rows in ``rows`` (indices into
    the input list, in order), and ``errors[i]`` (a :class:`DecodeError`) for every input that failed."""

    pixels: torch.Tensor
    rows: list[int]
    errors: dict[int, DecodeError]
    on_device: int  # how many of ``rows`` the device decoder handled (the rest: CPU fallback)


def _plain_jpeg(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) when the device decoder can take ``data``, else None."""
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
        self.decodes_on_device = pre.fast and pre.interpolation in ("bicubic", "bilinear")
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.side = pre.size[0]
        self.mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"

    def _device_sized(self, header: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        """``header`` when the device resize of that image stays within :func:`~clipn_core.images.resized_limit`
        (its shortest-side resize grows with the aspect ratio: 8,000 x 1 would be 224 x 1.8 million floats), else
        None: the CPU path resamples only the crop box."""
        if header is None:
            return None
        w, h, _ = header
        new_w, new_h = self._resized(w, h)
        return header if new_w * new_h <= resized_limit(w, h, (self.side, self.side)) else None

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of a ``w`` x ``h`` image with its shortest side resized to ``side`` (torchvision's)."""
        side = self.side
        return (side, int(side * h / w)) if w <= h else (int(side * w / h), side)

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> uint8 [3, side, side]: shortest side to ``side`` (antialiased), centre crop."""
        _, h, w = x.shape
        side = self.side
        new_w, new_h = self._resized(w, h)
        y = x[None].float()
        if (new_h, new_w) != (h, w):
            y = F.interpolate(y, size=(new_h, new_w), mode=self.mode, antialias=True, align_corners=False)
        top, left = int(round((new_h - side) / 2.0)), int(round((new_w - side) / 2.0))
        return y[0, :, top:top + side, left:left + side].round_().clamp_(0, 255).to(torch.uint8)

    def _decode_jpegs(self, datas: list[bytes], headers: list[tuple[int, int, int]]) -> list[torch.Tensor | None]:
        """Device decode in chunks of bounded decoded size; None for an image the decoder refuses."""
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg

        def decode_jpeg(data, **kw):
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec (README, "Decoding on the GPU")
                warnings.simplefilter("ignore", DeprecationWarning)
                return tv_decode_jpeg(data, **kw)

        out: list[torch.Tensor | None] = []
        start = 0
        while start < len(datas):
            end, pixels = start, 0
            while end < len(datas) and (end == start or pixels + headers[end][0] * headers[end][1] <= _MAX_CHUNK_PIXELS):
                pixels += headers[end][0] * headers[end][1]
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
            for (width, height, orientation), x in zip(headers[start:end], decoded):
                ok = x is not None and tuple(x.shape[-2:]) == (height, width)
                out.append(self._resize_crop(orient(x, orientation)) if ok else None)
            start = end
        return out

    def __call__(self, datas: list[bytes]) -> DeviceBatch:
        """Decode every item of ``datas``; failures come back as typed errors, never raised."""
        # the device resize implements fast mode's geometry only; exact pixels come from the CPU path
        headers = [self._device_sized(_plain_jpeg(d, self.max_pixels)) if self.decodes_on_device else None
                   for d in datas]
        device_rows = [i for i, h in enumerate(headers) if h is not None]
        decoded: dict[int, torch.Tensor] = {}
        if device_rows:
            results = self._decode_jpegs([datas[i] for i in device_rows], [headers[i] for i in device_rows])
            decoded = {i: x for i, x in zip(device_rows, results) if x is not None}
        on_device = len(decoded)
        errors: dict[int, DecodeError] = {}
        for i, data in enumerate(datas):
            if i in decoded:
                continue
            out = self.pre.decode(data, self.max_pixels)
            if isinstance(out, DecodeError):
                errors[i] = out
            else:
                decoded[i] = torch.from_numpy(out).to(self.device)
        rows = sorted(decoded)
        pixels = (torch.stack([decoded[i] for i in rows]) if rows
                  else torch.zeros((0, 3, self.side, self.side), dtype=torch.uint8, device=self.device))
        return DeviceBatch(pixels, rows, errors, on_device)

