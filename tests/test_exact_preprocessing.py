"""What ``exact`` is: open_clip's geometry and normalisation on the image our decoder produces, on every decode path.

For 8-bit RGB and greyscale images without alpha or EXIF rotation, the uint8 pixels after resize and crop
equal open_clip's own transform on ``Image.open(...)`` and the normalised tensor agrees within 1e-6; for
the others the result is open_clip's transform of the documented conversion (alpha over white, EXIF
orientation applied, 16/32-bit integers divided by 257 and rounded, floats scaled from their range;
palette, 1-bit and CMYK images converted to RGB before the resize, where open_clip resizes them in their
own mode), and differs from open_clip's own path.
"""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import Compose

from clipn_core.device_decode import DeviceDecoder
from clipn_core.images import DecodedImage, SplitPreprocessor, decode_image, image_transform

OPENAI = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CONFIGS = {  # the geometries open_clip's tags use
    "shortest-bicubic": {"size": (64, 64), **OPENAI, "interpolation": "bicubic", "resize_mode": "shortest"},
    "squash-bilinear": {"size": (48, 48), **IMAGENET, "interpolation": "bilinear", "resize_mode": "squash"},
    "longest-bicubic": {"size": (56, 56), **OPENAI, "interpolation": "bicubic", "resize_mode": "longest"},
}


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _with_alpha(img: Image.Image, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = img.convert("RGBA")
    alpha = np.zeros((img.height, img.width), np.uint8)
    alpha[:, img.width // 3:] = rng.integers(0, 256, (img.height, img.width - img.width // 3))  # clear, then mixed
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _animated_gif() -> bytes:
    frames = [_photo(70, 50, 30).convert("P"), _photo(70, 50, 31).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buf.getvalue()


def _palette_with_transparency() -> bytes:
    pal = _photo(60, 40, 12).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(pal, "PNG", transparency=int(np.asarray(pal)[0, 0]))


def corpus() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, departure): None for images open_clip's path handles right."""
    p = _photo(120, 90, 1)
    grey16 = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    grey32 = (np.linspace(-5000, 70000, 80 * 60).reshape(60, 80)).astype(np.int32)
    floats = np.linspace(-1.5, 3.0, 80 * 60, dtype=np.float32).reshape(60, 80)
    return {
        "jpeg": (_save(p, "JPEG", quality=90), None),
        "jpeg-progressive": (_save(_photo(130, 70, 2), "JPEG", quality=85, progressive=True), None),
        "jpeg-small-upscaled": (_save(_photo(30, 21, 3), "JPEG", quality=95), None),
        "jpeg-tall": (_save(_photo(40, 150, 4), "JPEG", quality=90), None),
        "jpeg-grey": (_save(_photo(90, 90, 5).convert("L"), "JPEG", quality=90), None),
        "jpeg-cmyk": (_save(_photo(80, 60, 6).convert("CMYK"), "JPEG", quality=95), "rgb-first"),
        "jpeg-exif-upright": (_save(_photo(100, 60, 7), "JPEG", quality=90, exif=_exif(1)), None),
        "png-rgb": (_save(_photo(70, 90, 8), "PNG"), None),
        "png-grey": (_save(_photo(64, 64, 9).convert("L"), "PNG"), None),
        "png-1bit": (_save(_photo(64, 48, 10).convert("1"), "PNG"), "rgb-first"),
        "png-palette": (_save(_photo(64, 48, 11).convert("P"), "PNG"), "rgb-first"),
        "gif-animated": (_animated_gif(), "rgb-first"),
        "webp-lossy": (_save(_photo(100, 80, 13), "WEBP", quality=80), None),
        "webp-lossless": (_save(_photo(50, 80, 14), "WEBP", lossless=True), None),
        "bmp": (_save(_photo(66, 44, 15), "BMP"), None),
        "tiff-rgb": (_save(_photo(72, 54, 16), "TIFF"), None),
        "png-rgba": (_save(_with_alpha(_photo(80, 60, 17), 17), "PNG"), "alpha"),
        "png-grey-alpha": (_save(_with_alpha(_photo(80, 60, 18), 18).convert("LA"), "PNG"), "alpha"),
        "png-palette-transparency": (_palette_with_transparency(), "alpha"),
        "webp-alpha": (_save(_with_alpha(_photo(80, 60, 19), 19), "WEBP", lossless=True), "alpha"),
        "jpeg-exif-rotated-6": (_save(_photo(100, 60, 20), "JPEG", quality=90, exif=_exif(6)), "exif"),
        "jpeg-exif-rotated-3": (_save(_photo(100, 60, 21), "JPEG", quality=90, exif=_exif(3)), "exif"),
        "jpeg-exif-mirrored-5": (_save(_photo(100, 60, 22), "JPEG", quality=90, exif=_exif(5)), "exif"),
        "png-16bit": (_save(Image.fromarray(grey16), "PNG"), "integer"),
        "tiff-32bit-int": (_save(Image.fromarray(grey32, "I"), "TIFF"), "integer"),
        "tiff-float": (_save(Image.fromarray(floats, "F"), "TIFF"), "float"),
        "tiff-float-unit": (_save(Image.fromarray(np.linspace(0.2, 0.5, 80 * 60, dtype=np.float32).reshape(60, 80),
                                                  "F"), "TIFF"), "float"),
        "png-16bit-dark": (_save(Image.fromarray((np.arange(80 * 60) % 199).astype(np.uint16).reshape(60, 80)),
                                 "PNG"), "integer"),
        "tiff-32bit-int-8bit-range": (_save(Image.fromarray(np.asarray(_photo(80, 60, 23).convert("L"),
                                                                      dtype=np.int32), "I"), "TIFF"), "integer"),
    }


CORPUS = corpus()


def documented_rgb(data: bytes, departure: str | None) -> Image.Image:
    """The RGB image the module docstring says the decoder produces, written from the documentation."""
    img = Image.open(io.BytesIO(data))
    if departure in (None, "rgb-first"):  # rgb-first: converted before open_clip's resize, not after
        return img.convert("RGB")
    if departure == "exif":
        return ImageOps.exif_transpose(img).convert("RGB")
    if departure == "alpha":
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        a = rgba[..., 3:] / 255.0
        return Image.fromarray(np.rint(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8))
    arr = np.asarray(img, dtype=np.float64)
    if departure == "integer":  # 16-bit: / 257; 32-bit: / 257 only when a value exceeds 255
        scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        grey = np.clip(np.rint(arr / scale), 0, 255)
    else:  # float: [0, 1] times 255, a wider range from [min(0, low), max(1, high)]
        low, high = min(arr.min(), 0.0), max(arr.max(), 1.0)
        grey = np.rint((arr - low) / (high - low) * 255.0)
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def open_clip_transform(cfg: dict):
    """open_clip's own eval transform for ``cfg``, from its public API: (geometry part, whole transform)."""
    whole = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                      resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
    return Compose(whole.transforms[:-2]), whole  # the last two: ToTensor, Normalize


def _uint8(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def decode_paths(cfg: dict):
    """Every decode path, as name -> bytes -> (uint8 [3, H, W] or None, normalised float [3, H, W])."""
    exact = SplitPreprocessor(cfg, mode="exact")
    device = DeviceDecoder(SplitPreprocessor(cfg, mode="exact"), "cpu")
    library = image_transform(cfg)

    def lib(data):
        out = decode_image(data, library)
        assert isinstance(out, DecodedImage), out
        return None, out.tensor

    def cpu(data):  # the scoring job's decode tasks, clipn evaluate and clipn calibrate
        px = exact.decode(data)
        assert isinstance(px, np.ndarray), px
        return px, exact.normalize(torch.from_numpy(px)[None])[0]

    def dev(data):  # runtime.decode: device (the scorer actor's decoder)
        out = device([data])
        assert out.rows == [0] and out.on_device == 0, out.errors  # exact: no image is resized on the device
        px = out.pixels[0].numpy()
        return px, exact.normalize(out.pixels)[0]

    return {"library": lib, "cpu": cpu, "device": dev}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("path", ["library", "cpu", "device"])
def test_exact_is_open_clips_transform_of_our_decoded_image_on_every_decode_path(cfg_name, path):
    cfg = CONFIGS[cfg_name]
    geometry, whole = open_clip_transform(cfg)
    run = decode_paths(cfg)[path]
    for name, (data, departure) in CORPUS.items():
        pixels, tensor = run(data)
        rgb = documented_rgb(data, departure)
        if pixels is not None:
            np.testing.assert_array_equal(pixels, _uint8(geometry(rgb)), err_msg=name)
        torch.testing.assert_close(tensor, whole(rgb), atol=1e-6, rtol=0, msg=name)
        plain = whole(Image.open(io.BytesIO(data)))  # open_clip's own path on the file
        if departure is None:
            torch.testing.assert_close(tensor, plain, atol=1e-6, rtol=0, msg=name)
            if pixels is not None:
                np.testing.assert_array_equal(pixels, _uint8(geometry(Image.open(io.BytesIO(data)))), err_msg=name)
        elif departure == "rgb-first" or not np.array_equal(np.asarray(rgb), np.asarray(
                Image.open(io.BytesIO(data)).convert("RGB"))):  # the departure is real: open_clip shows another picture
            assert (tensor - plain).abs().max() > 1e-3, (name, departure)


def test_the_corpus_has_every_kind():
    kinds = {d for _, d in CORPUS.values()}
    assert kinds == {None, "alpha", "exif", "integer", "float", "rgb-first"}
    modes = {Image.open(io.BytesIO(data)).mode for data, _ in CORPUS.values()}
    assert {"RGB", "L", "1", "P", "CMYK", "RGBA", "LA", "I;16", "I", "F"} <= modes, modes


def test_device_decoding_happens_only_in_fast_mode_with_its_geometry():
    fast = DeviceDecoder(SplitPreprocessor(CONFIGS["shortest-bicubic"], mode="fast"), "cpu")
    assert fast.decodes_on_device and fast([CORPUS["jpeg"][0]]).on_device == 1
    for cfg, mode in ((CONFIGS["shortest-bicubic"], "exact"), (CONFIGS["squash-bilinear"], "fast"),
                      (CONFIGS["longest-bicubic"], "fast")):
        decoder = DeviceDecoder(SplitPreprocessor(cfg, mode=mode), "cpu")
        assert not decoder.decodes_on_device and decoder([CORPUS["jpeg"][0]]).on_device == 0
