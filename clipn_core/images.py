"""Image bytes -> preprocessed tensor, using the model's own open_clip preprocessing config.

Decoding never raises for bad input: every failure comes back as a :class:`DecodeError`
value (``kind`` + message) so one bad object cannot kill a batch. Before any pixel is
decoded the header's size is checked against ``max_pixels`` (decompression bombs).

Conversions to RGB: EXIF orientation applied; palette and greyscale expanded; alpha
composited over white; CMYK converted; 16-bit and 32-bit integer images scaled to 8
bits (Pillow's own ``convert("RGB")`` would clip them to white). Animated images
use their first frame.
"""

from __future__ import annotations

import functools
import io
import json
import warnings
from dataclasses import dataclass, fields
from enum import Enum

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000; a 24-bit RGB decode of that is ~192 MB


class DecodeErrorKind(str, Enum):
    """Why an image could not be used. The values are the ``status`` strings of the output."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MODE = "unsupported_mode"
    DECODE_ERROR = "decode_error"


@dataclass(frozen=True)
class DecodeError:
    """A failed decode: ``kind`` (machine-readable) and ``message`` (for people)."""

    kind: DecodeErrorKind
    message: str


@dataclass(frozen=True)
class DecodedImage:
    """A preprocessed image tensor [3, H, W] float32 and the source's (width, height, mode)."""

    tensor: torch.Tensor
    width: int
    height: int
    mode: str


def image_transform(preprocess_cfg: dict, is_train: bool = False):
    """open_clip's transform for a model's preprocess config: eval (resize, centre crop, to tensor,
    normalise) or, with ``is_train``, train (random resized crop, to tensor, normalise)."""
    known = {f.name for f in fields(PreprocessCfg)}
    cfg = {k: v for k, v in preprocess_cfg.items() if k in known}
    for key in ("size", "mean", "std"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    return image_transform_v2(PreprocessCfg(**cfg), is_train=is_train)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (see module docstring for the rules)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 1.0
        return Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, int, int, str] | DecodeError:
    """Bytes -> (8-bit RGB image with EXIF orientation applied, source width, height, mode), or a DecodeError."""
    if not data:
        return DecodeError(DecodeErrorKind.EMPTY, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return DecodeError(
                    DecodeErrorKind.TOO_LARGE,
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                )
            mode = img.mode
            img.seek(0)  # first frame of animated GIF/PNG/WebP
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img), width, height, mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodeError(DecodeErrorKind.TOO_LARGE, str(e))
    except UnidentifiedImageError:
        return DecodeError(DecodeErrorKind.NOT_AN_IMAGE, "not a recognised image format")
    except (OSError, SyntaxError, EOFError) as e:
        msg = str(e)
        truncated = "truncated" in msg or isinstance(e, EOFError)
        kind = DecodeErrorKind.TRUNCATED if truncated else DecodeErrorKind.DECODE_ERROR
        return DecodeError(kind, f"{type(e).__name__}: {msg}")
    except ValueError as e:
        return DecodeError(DecodeErrorKind.UNSUPPORTED_MODE, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - the contract: a bad image never kills the batch
        return DecodeError(DecodeErrorKind.DECODE_ERROR, f"{type(e).__name__}: {e}")


def decode_image(data: bytes, transform, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage | DecodeError:
    """Decode and preprocess one image into [3, H, W]; never raises for bad bytes (returns a DecodeError)."""
    loaded = load_rgb(data, max_pixels)
    if isinstance(loaded, DecodeError):
        return loaded
    rgb, width, height, mode = loaded
    try:
        tensor = transform(rgb)
    except Exception as e:  # noqa: BLE001
        return DecodeError(DecodeErrorKind.DECODE_ERROR, f"preprocessing failed: {type(e).__name__}: {e}")
    return DecodedImage(tensor, width, height, mode)


class SplitPreprocessor:
    """The model's eval (or, with ``is_train``, train) transform split in two halves, for pipelines
    that ship pixels between processes.

    ``to_uint8`` runs the geometric part (resize, crop) on a CPU worker and returns
    uint8 [3, H, W]: a quarter of the bytes of a float tensor. ``normalize`` finishes
    on the scoring device: ``(x / 255 - mean) / std``, the same arithmetic as open_clip's
    ToTensor + Normalize, so results equal :func:`decode_image`'s to float rounding.
    """

    def __init__(self, preprocess_cfg: dict, is_train: bool = False):
        from torchvision.transforms import Compose, Normalize

        full = image_transform(preprocess_cfg, is_train=is_train)
        steps = list(full.transforms)
        norm = steps[-1]
        if not isinstance(norm, Normalize) or "ToTensor" not in type(steps[-2]).__name__:
            raise ValueError(f"unexpected open_clip eval transform layout: {full}")
        self.geometry = Compose(steps[:-2])
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
        size = preprocess_cfg.get("size", 224)
        self.size = tuple(size) if isinstance(size, list | tuple) else (size, size)

    def to_uint8(self, rgb: Image.Image) -> np.ndarray:
        """RGB PIL image -> resized/cropped uint8 array [3, H, W]."""
        out = self.geometry(rgb)
        arr = np.asarray(out.convert("RGB") if isinstance(out, Image.Image) else out, dtype=np.uint8)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] (any device) -> normalised float32 [N, 3, H, W] on the same device."""
        x = pixels.float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


@functools.lru_cache(maxsize=8)
def _cached_split_preprocessor(preprocess_json: str, is_train: bool) -> SplitPreprocessor:
    return SplitPreprocessor(json.loads(preprocess_json), is_train=is_train)


def split_preprocessor(preprocess_cfg: dict, is_train: bool = False) -> SplitPreprocessor:
    """A :class:`SplitPreprocessor` built once per process and config (decode tasks call this per batch)."""
    return _cached_split_preprocessor(json.dumps(preprocess_cfg, sort_keys=True, default=list), is_train)
