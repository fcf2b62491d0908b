"""The real-photo set of ``make bench-real``: Tux Paint's stamps and scikit-image's sample images, split into
ID training pairs, ID test images, near OOD and far OOD, with captions built from the stamps' own metadata.

Tux Paint's stamps (Debian ``tuxpaint-stamps-default``, GPL-2, installed by ``make bench-real``) are cut-out
photos and drawings under ``<root>/<group>/<category>[/<sub-category>]/<name>.png``, most with ``<name>.txt``
beside them whose first line is an English description ("A great blue heron."); ``cartoon/`` and ``toys/``
folders hold drawings of their parent category. SVG stamps are left out (PIL cannot read them).

Roles (:func:`role_of`): ID is four animal categories with enough images (:data:`ID_CLASSES`); near OOD is every
other animal category (the other mammals, marsupials, amphibians, reptiles, shellfish); far OOD is other groups
(:data:`FAR_GROUPS`). ID images are split per class into training and test images by a hash of their path
(:func:`split_id`), so a test image is never trained on. The optional broad training pool (:func:`broad_stamps`) is
drawn only from the groups no split uses (people, symbols, seasonal, ...), without their animals and without any file
whose bytes equal an evaluated stamp's.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")

# category folder (relative to the stamps root, style folders removed) -> ID class name
ID_CLASSES = {"animals/birds": "bird", "animals/insects": "insect", "animals/fish": "fish",
              "animals/mammals/bovines": "bovine"}
NEAR_GROUP = "animals"
FAR_GROUPS = ("food", "plants", "vehicles", "household", "town")
# folders that hold drawings of their parent category, not a category of their own
STYLE_FOLDERS = {"cartoon", "toys"}

# scikit-image's bundled samples (skimage.data functions that need no download): animals are near OOD (held-out
# categories of the ID group), the rest far
SKIMAGE_NEAR = ("cat", "horse")
SKIMAGE_FAR = ("astronaut", "brick", "camera", "coffee", "coins", "grass", "gravel", "rocket", "moon", "page", "text",
               "hubble_deep_field", "retina", "immunohistochemistry", "cell", "logo", "colorwheel", "clock",
               "checkerboard", "microaneurysms")

# Words of a stamp's file name that mark an animal: the unused groups hold a few (seasonal/easter's bluebird, chick and
# butterfly and halloween's spider are ID classes, Tux Paint files spiders under insects; the bunnies, bat and black
# cat are the near split's subject), so the broad pool drops them and stays "none of the ID classes, and not the near
# split's animals".
ANIMAL_WORDS = frozenset({"bluebird", "butterfly", "chick", "bunny", "bat", "blackcat", "spider"})

# Caption styles of the training pairs; the first is the scoring template (TEMPLATE) with the class name in it.
TEMPLATE = "a photo of the {}."
CAPTION_STYLES = 4


@dataclass(frozen=True)
class Stamp:
    """One stamp image: ``path`` (the PNG), ``category`` (e.g. ``animals/mammals/bovines``), ``name`` (words of its
    file name), ``description`` (first line of the .txt beside it, or None)."""

    path: Path
    category: str
    name: str
    description: str | None

    @property
    def group(self) -> str:
        return self.category.split("/")[0]


def stamp_name(path: Path) -> str:
    """Words of a stamp's file name: ``heron_greatblue-2.png`` -> ``heron greatblue``."""
    words = re.sub(r"[\d_\-]+", " ", path.stem).split()
    return " ".join(words).lower() or path.stem.lower()


_TRANSLATION = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?(@\w+)?\.utf8=")


def read_description(png: Path) -> str | None:
    """The English description beside a stamp (first line of ``<name>.txt``, the untranslated one), or None."""
    txt = png.with_suffix(".txt")
    if not txt.is_file():
        return None
    first = txt.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
    text = first[0].strip() if first else ""
    # a .txt without an English line starts with a translation, "fr.utf8=..."
    return text if text and not _TRANSLATION.match(text) else None


def find_stamps(root: Path = STAMPS_ROOT) -> list[Stamp]:
    """Every PNG stamp under ``root``, sorted by path. Its category is its folder with style folders
    (:data:`STYLE_FOLDERS`) removed, so ``animals/birds/cartoon/tux.png`` is a bird."""
    stamps = []
    for png in sorted(root.rglob("*.png")):
        parts = [p for p in png.relative_to(root).parent.parts if p not in STYLE_FOLDERS]
        if parts:
            stamps.append(Stamp(png, "/".join(parts), stamp_name(png), read_description(png)))
    return stamps


def role_of(stamp: Stamp) -> tuple[str, str | None] | None:
    """``("id", class)`` for an ID category, ``("near", None)`` for another animal, ``("far", None)`` for a far group,
    None for a stamp the benchmark does not use (people, symbols, seasonal, ...)."""
    for category, cls in ID_CLASSES.items():
        if stamp.category == category or stamp.category.startswith(category + "/"):
            return "id", cls
    if stamp.group == NEAR_GROUP:
        return "near", None
    if stamp.group in FAR_GROUPS:
        return "far", None
    return None


def _rank(path: Path, root: Path, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{path.relative_to(root).as_posix()}".encode()).hexdigest()


def split_id(stamps: list[Stamp], root: Path, test_share: float, seed: int) -> tuple[list[Stamp], list[Stamp]]:
    """(train, test) of the ID stamps: per class, ``round(test_share * n)`` (at least 1) go to test, chosen by a
    seeded hash of the path relative to ``root`` (stable across machines and runs). Raises ``ValueError`` when a
    class has fewer than 2 images (it could not be both trained on and tested)."""
    by_class: dict[str, list[Stamp]] = {}
    for s in stamps:
        role = role_of(s)
        if role is not None and role[0] == "id":
            by_class.setdefault(role[1], []).append(s)
    train, test = [], []
    for cls, members in sorted(by_class.items()):
        if len(members) < 2:
            raise ValueError(f"ID class {cls!r} has {len(members)} image(s); it needs 2 or more")
        members = sorted(members, key=lambda s: _rank(s.path, root, seed))
        k = max(1, round(test_share * len(members)))
        test += members[:k]
        train += members[k:]
    return train, test


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def broad_stamps(stamps: list[Stamp], root: Path, per_category: int, seed: int) -> list[Stamp]:
    """The broad training pool: stamps of groups no split uses (:func:`role_of` None), minus animals
    (:data:`ANIMAL_WORDS` in the file name) and minus any file whose bytes equal an ID, near or far stamp's (a copy
    filed under two groups would otherwise be trained on and evaluated); at most ``per_category`` per category
    folder, chosen by a seeded hash of the path relative to ``root`` (the alphabets' ~190 letters would otherwise
    be half the pool). Sorted by path."""
    evaluated = {_digest(s.path) for s in stamps if role_of(s) is not None}
    by_category: dict[str, list[Stamp]] = {}
    for s in stamps:
        if role_of(s) is None and not ANIMAL_WORDS & set(s.name.split()) and _digest(s.path) not in evaluated:
            by_category.setdefault(s.category, []).append(s)
    chosen = [s for members in by_category.values()
              for s in sorted(members, key=lambda s: _rank(s.path, root, seed))[:per_category]]
    return sorted(chosen, key=lambda s: s.path)


def broad_caption(stamp: Stamp, style: int) -> str:
    """The training caption of a broad-pool stamp (no ID class): style 0 its description where it has one, else
    (and style 1) ``a photo of the <file name words>.``"""
    if style % 2 == 0 and stamp.description:
        return stamp.description.lower()
    return f"a photo of the {stamp.name}."


def caption(stamp: Stamp, cls: str, style: int) -> str:
    """The training caption of ``stamp`` (ID class ``cls``) in caption style ``style`` (mod :data:`CAPTION_STYLES`):
    0 the scoring template with the class, 1 class and file name, 2 description and class, 3 file name and class
    (styles 2 falls back to 1 without a description)."""
    style %= CAPTION_STYLES
    desc = stamp.description.rstrip(".!").lower() if stamp.description else None
    if style == 0:
        return TEMPLATE.format(cls)
    if style == 2 and desc:
        return f"{desc}, a photo of the {cls}."
    if style == 3:
        return f"the {stamp.name}, a {cls}."
    return f"a photo of the {cls}: {stamp.name}."


def flatten(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB of any PIL image, transparent parts on ``background`` (stamps are cut-outs)."""
    if img.mode in ("LA", "PA", "P") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def render(img: Image.Image, size: int = 256, fill: float = 0.875, mirror: bool = False,
           background: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    """A ``size`` x ``size`` JPEG (quality 90) of ``img`` with its longer side ``fill x size`` pixels, centred on
    ``background``: the whole object stays inside the model's centre crop."""
    rgb = flatten(img, background)
    scale = fill * size / max(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    if mirror:
        rgb = rgb.transpose(Image.FLIP_LEFT_RIGHT)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Training variants of one ID image (the lit stage never augments; these are its fixed augmentations):
# mirror x object size x background (white or a pale tint)
VARIANTS = [(mirror, fill, bg) for mirror in (False, True) for fill in (0.875, 0.65)
            for bg in ((255, 255, 255), (232, 236, 226))]
# Variants of a broad-pool image: the plain one and the mirrored, smaller one on the pale tint, so both backgrounds
# of the ID pairs occur outside ID too (the pale tint must not become an ID cue)
BROAD_VARIANTS = [VARIANTS[0], VARIANTS[-1]]
