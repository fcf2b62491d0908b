"""Thumbnails: the selected images read back through the job's storage and decode, as small JPEGs.

Objects are fetched as the scoring job fetches them (:func:`jobs.score.read.fetch`: one GET per object, a bounded
number in flight); a tar member (``<shard>.tar#<member>``, the URI the job gives it) is read by streaming its shard
once (:func:`jobs.inputs.tar_entries`) for all the members wanted from it. Bytes are decoded by the job's own
:func:`clipn_core.images.load_rgb` (EXIF orientation, alpha over white, the ``max_pixels`` limit), JPEGs drafted
down to about the thumbnail's size. An image that can no longer be read or decoded gets no thumbnail but a note
saying why; nothing here raises for one image.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from clipn_core.errors import redact_uri
from clipn_core.images import DecodeError, load_rgb
from clipn_core.storage import Storage

PLACEHOLDER = "placeholder.png"
_TAR = ".tar#"


@dataclass(frozen=True)
class Thumb:
    """A thumbnail's file name (relative to the thumbnail folder), or None with ``note`` saying why there is none."""

    file: str | None
    note: str | None = None


def thumb_name(uri: str) -> str:
    """A file name for ``uri``'s thumbnail: a hash, so names from users' data never reach the file system."""
    return hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:24] + ".jpg"


def split_tar_uri(uri: str) -> tuple[str, str] | None:
    """(shard URI, member name) of a tar member's URI (``<shard>.tar#<member>``), None for any other URI."""
    i = uri.lower().find(_TAR)
    if i < 0:
        return None
    return uri[:i + len(".tar")], uri[i + len(_TAR):]


def write_placeholder(folder: Path, px: int) -> str:
    """A grey square with a cross, ``px`` pixels a side, shown in place of an unreadable image; its file name."""
    img = Image.new("RGB", (px, px), (225, 225, 225))
    draw = ImageDraw.Draw(img)
    draw.line((px // 4, px // 4, 3 * px // 4, 3 * px // 4), fill=(150, 150, 150), width=max(2, px // 32))
    draw.line((px // 4, 3 * px // 4, 3 * px // 4, px // 4), fill=(150, 150, 150), width=max(2, px // 32))
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / PLACEHOLDER)
    return PLACEHOLDER


def _read_all(uris: list[str], storage: Storage, concurrency: int) -> dict[str, bytes | Exception]:
    """Bytes (or the error that stopped the read) of every URI: objects fetched concurrently, tar members by
    streaming each shard once."""
    from jobs.inputs import tar_entries
    from jobs.score.read import fetch

    got: dict[str, bytes | Exception] = {}
    members: dict[str, dict[str, str]] = {}  # shard -> member name -> URI
    plain = []
    for uri in uris:
        split = split_tar_uri(uri)
        if split is None:
            plain.append(uri)
        else:
            members.setdefault(split[0], {})[split[1]] = uri
    for uri, data in zip(plain, fetch(plain, storage, concurrency)):
        got[uri] = data
    for shard, wanted in members.items():
        try:
            for entry, read in tar_entries(shard, storage):
                uri = wanted.get(entry.name)
                if uri is not None and uri not in got:  # the job keeps a name's first member; so does the page
                    got[uri] = read() if entry.kind == "file" else ValueError(f"tar member is a {entry.detail}")
                    if all(u in got for u in wanted.values()):
                        break
        except Exception as e:  # noqa: BLE001 - a torn or missing shard: its members' notes say so
            for uri in wanted.values():
                got.setdefault(uri, e)
        for name, uri in wanted.items():
            got.setdefault(uri, FileNotFoundError(f"no member {name!r} in {redact_uri(shard)}"))
    return got


def make_thumbnail(data: bytes, target: Path, px: int, max_pixels: int) -> str | None:
    """Decode ``data`` with the job's decoder and save a JPEG whose longest side is at most ``px`` to ``target``;
    None on success, else why it could not be decoded (the decoder's status kind and message)."""
    loaded = load_rgb(data, max_pixels, draft_short_side=px)
    if isinstance(loaded, DecodeError):
        return f"{loaded.kind.value}: {loaded.message}"
    rgb = loaded[0]
    rgb.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    target.write_bytes(buf.getvalue())
    return None


def make_thumbnails(uris: list[str], folder: Path, storage: Storage, px: int = 160, max_pixels: int = 64_000_000,
                    concurrency: int = 16) -> dict[str, Thumb]:
    """A :class:`Thumb` per URI (each URI read once), JPEGs written under ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(uris))
    out = {}
    for uri, data in _read_all(unique, storage, concurrency).items():
        if isinstance(data, Exception):
            out[uri] = Thumb(None, f"cannot read it now: {type(data).__name__}: {redact_uri(str(data))}")
            continue
        name = thumb_name(uri)
        why = make_thumbnail(data, folder / name, px, max_pixels)
        out[uri] = Thumb(None, f"cannot decode it now: {why}") if why else Thumb(name)
    return out
