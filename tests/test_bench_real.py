"""benchmarks/real_photos.py on a fake Tux Paint stamps folder: which stamps are ID, near or far OOD, the ID
train/test split, and the captions built from the stamps' folders, file names and descriptions."""

from pathlib import Path

import pytest
from PIL import Image

from benchmarks import real_photos as rp

STAMPS = {
    "animals/birds/blackbird.png": "A blackbird.\nfr.utf8=Un merle.",
    "animals/birds/cartoon/tux.png": "Tux the penguin!",
    "animals/birds/heron_greatblue-2.png": "fr.utf8=Un heron.",  # no English line
    "animals/birds/crow.png": None,
    "animals/birds/swallow.svg": None,  # not readable by PIL: left out
    "animals/mammals/bovines/cow.png": "A cow.",
    "animals/mammals/bovines/cartoon/bull.png": "A bull.",
    "animals/mammals/bovines/yak.png": "A yak.",
    "animals/mammals/cats/lion.png": "A lion.",
    "animals/mammals/pig.png": "A pig.",  # the mammals folder itself is not the bovines category
    "animals/shellfish/abalone.png": "An abalone.",
    "food/fruit/apple.png": "An apple.",
    "household/calculator.png": "A calculator.  6x7=42",
    "symbols/star.png": "A star.",
    "symbols/letters/a.png": "The letter a.",
    "symbols/letters/b.png": "The letter b.",
    "symbols/letters/c.png": None,
    "seasonal/easter/bluebird.png": "A bluebird.",  # an ID class outside the animals group
    "seasonal/halloween/bat_left.png": "A bat.",  # a near-OOD animal outside it
    "people/fireman_a.png": "A fireman.",
    "people/apple_copy.png": "An apple.",  # a byte copy of food/fruit/apple.png
}


@pytest.fixture
def stamps_root(tmp_path: Path) -> Path:
    for i, (rel, text) in enumerate(STAMPS.items()):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "people/apple_copy.png":
            path.write_bytes((tmp_path / "food/fruit/apple.png").read_bytes())
        elif rel.endswith(".png"):
            Image.new("RGBA", (40, 20), (10, 200, i, 255)).save(path)  # bytes differ per stamp
        else:
            path.write_text("<svg/>")
        if text is not None:
            path.with_suffix(".txt").write_text(text + "\n")
    return tmp_path


def _by_name(root: Path) -> dict[str, rp.Stamp]:
    return {s.path.relative_to(root).as_posix(): s for s in rp.find_stamps(root)}


def test_roles_follow_the_category_folders(stamps_root):
    stamps = _by_name(stamps_root)
    assert "animals/birds/swallow.svg" not in stamps
    roles = {k: rp.role_of(s) for k, s in stamps.items()}
    assert roles["animals/birds/cartoon/tux.png"] == ("id", "bird")  # a drawing of its parent category
    assert roles["animals/mammals/bovines/cartoon/bull.png"] == ("id", "bovine")
    assert roles["animals/mammals/cats/lion.png"] == ("near", None)
    assert roles["animals/mammals/pig.png"] == ("near", None)
    assert roles["animals/shellfish/abalone.png"] == ("near", None)
    assert roles["food/fruit/apple.png"] == ("far", None)
    assert roles["household/calculator.png"] == ("far", None)
    assert roles["symbols/star.png"] is None


def test_id_split_is_per_class_disjoint_and_stable(stamps_root):
    stamps = rp.find_stamps(stamps_root)
    train, test = rp.split_id(stamps, stamps_root, test_share=0.4, seed=0)
    ids = {s.path for s in stamps if (rp.role_of(s) or ("",))[0] == "id"}
    assert {s.path for s in train} | {s.path for s in test} == ids
    assert not {s.path for s in train} & {s.path for s in test}
    test_classes = sorted(rp.role_of(s)[1] for s in test)
    assert test_classes == ["bird", "bird", "bovine"]  # round(0.4 x 4) birds, round(0.4 x 3) bovines
    assert rp.split_id(list(reversed(stamps)), stamps_root, 0.4, 0) == (train, test)
    assert rp.split_id(stamps, stamps_root, 0.4, 1) != (train, test)  # the seed chooses (for these paths)


def test_a_class_of_one_image_is_refused(stamps_root):
    (stamps_root / "animals/fish").mkdir()
    Image.new("RGB", (8, 8)).save(stamps_root / "animals/fish/nemo.png")
    with pytest.raises(ValueError, match="'fish' has 1 image"):
        rp.split_id(rp.find_stamps(stamps_root), stamps_root, 0.4, 0)


def test_broad_pool_is_disjoint_from_every_split(stamps_root):
    stamps = rp.find_stamps(stamps_root)
    broad = rp.broad_stamps(stamps, stamps_root, per_category=2, seed=0)
    chosen = {s.path.relative_to(stamps_root).as_posix() for s in broad}
    # animals (ID class or near subject) and a byte copy of a far stamp are left out; 2 of the 3 letters
    assert {c for c in chosen if not c.startswith("symbols/letters/")} == {"symbols/star.png", "people/fireman_a.png"}
    assert len([c for c in chosen if c.startswith("symbols/letters/")]) == 2
    evaluated = [s for s in stamps if rp.role_of(s) is not None]
    assert {s.path for s in evaluated} and not {s.path for s in evaluated} & {s.path for s in broad}
    assert not {s.path.read_bytes() for s in evaluated} & {s.path.read_bytes() for s in broad}
    assert rp.broad_stamps(list(reversed(stamps)), stamps_root, 2, 0) == broad
    fireman = next(s for s in broad if s.name == "fireman a")
    assert rp.broad_caption(fireman, 0) == "a fireman."
    assert rp.broad_caption(fireman, 1) == "a photo of the fireman a."


def test_captions_use_class_name_and_description(stamps_root):
    stamps = _by_name(stamps_root)
    blackbird, heron = stamps["animals/birds/blackbird.png"], stamps["animals/birds/heron_greatblue-2.png"]
    assert blackbird.description == "A blackbird."
    assert heron.description is None and heron.name == "heron greatblue"
    assert stamps["household/calculator.png"].description == "A calculator.  6x7=42"
    assert rp.caption(blackbird, "bird", 0) == rp.TEMPLATE.format("bird")  # the scoring template is a caption
    assert rp.caption(blackbird, "bird", 2) == "a blackbird, a photo of the bird."
    assert rp.caption(heron, "bird", 2) == rp.caption(heron, "bird", 1) == "a photo of the bird: heron greatblue."
    assert rp.caption(heron, "bird", 3 + rp.CAPTION_STYLES) == "the heron greatblue, a bird."


def test_render_puts_cut_outs_on_the_background_whole():
    import io

    img = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (0, 0, 100, 50))  # opaque red wide object
    out = Image.open(io.BytesIO(rp.render(img, size=64, fill=0.5, background=(255, 255, 255))))
    assert out.size == (64, 64) and out.mode == "RGB"
    px = out.convert("RGB").load()
    assert all(abs(a - b) < 12 for a, b in zip(px[2, 2], (255, 255, 255)))  # corner: background
    assert px[32, 32][0] > 150 and px[32, 32][1] < 60  # centre: the object
    assert px[32, 20][1] > 200  # the object is 32 x 16 px, centred: row 20 is above it
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0)).convert("P")  # palette image, transparent index
    assert min(Image.open(io.BytesIO(rp.render(transparent, size=16))).convert("L").getextrema()) > 240
