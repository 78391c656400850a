"""Dataset scanning of awkward files, image loading, buckets, captions, latent cache."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lora_core import dataset
from lora_core.dataset import DiskCache, Item, load_image, scan
from lora_core.errors import DatasetError


def _img(path, size=(96, 80), colour=(200, 30, 30), mode="RGB", caption=None, **save):
    img = Image.new(mode, size, colour)
    img.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _by_name(report):
    """({file name: Item}, {file name: {problem kind: Problem}})."""
    problems: dict = {}
    for p in report.problems:
        problems.setdefault(p.path.name, {})[p.kind] = p
    return {item.path.name: item for item in report.items}, problems


@pytest.fixture
def messy(tmp_path):
    """A folder with one of every awkward case."""
    d = tmp_path / "data"
    d.mkdir()
    _img(d / "good.png", caption="a red box, simple")
    _img(d / "nocap.png", colour=(0, 200, 0))
    _img(d / "latin.png", colour=(0, 0, 200))
    (d / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("I am not a JPEG", encoding="utf-8")
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _img(d / "tiny.png", size=(1, 1))
    (d / "zz copy of good.png").write_bytes((d / "good.png").read_bytes())
    _img(d / "rgba.png", mode="RGBA", colour=(255, 0, 0, 0), caption="transparent")
    pal = Image.new("P", (80, 80), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.save(d / "palette.png", transparency=0)
    _img(d / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0), caption="cmyk")
    Image.fromarray(np.full((70, 90), 65535, np.uint16)).save(d / "deep.png")
    _img(d / "ünïcode name ✓.webp", colour=(10, 20, 30), caption="unicode file")
    _img(d / "legacy.bmp", colour=(1, 2, 3), caption="bitmap")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    (d / "photo.heic").write_bytes(b"\0" * 10)
    sub = d / "3_concept"
    sub.mkdir()
    _img(sub / "c1.png", colour=(5, 5, 5), caption="concept one")
    (d / ".hidden").mkdir()
    _img(d / ".hidden" / "h.png", colour=(9, 9, 9))
    return d


def test_scan_messy_folder(messy):
    report = scan(messy, trigger_word="sks", default_caption="a photo")
    items, problems = _by_name(report)
    assert set(items) == {"good.png", "nocap.png", "latin.png", "rgba.png", "palette.png", "cmyk.jpg",
                          "deep.png", "ünïcode name ✓.webp", "legacy.bmp", "c1.png"}
    assert items["good.png"].caption == "sks, a red box, simple"
    assert items["nocap.png"].caption == "sks, a photo"
    assert not problems["nocap.png"]["caption_missing"].skipped
    assert items["latin.png"].caption == "sks, café crème"
    assert "caption_encoding" in problems["latin.txt"]
    assert items["c1.png"].repeats == 3 and items["good.png"].repeats == 1
    expected = {"empty.png": "unreadable", "text.jpg": "unreadable", "truncated.jpg": "unreadable",
                "tiny.png": "too_small", "photo.heic": "unsupported", "rgba.png": "converted",
                "palette.png": "converted", "cmyk.jpg": "converted", "deep.png": "converted"}
    for name, kind in expected.items():
        assert kind in problems[name], (name, problems.get(name))
        assert name in problems[name][kind].message
    dup = next(p for p in report.problems if p.kind == "duplicate")
    assert dup.skipped and "good.png" in dup.message
    assert "notes.md" not in problems and "h.png" not in items
    assert items["good.png"].sha256 == items["good.png"].sha256.lower() and len(items["good.png"].sha256) == 64
    assert (items["deep.png"].width, items["deep.png"].height) == (90, 70)
    summary = report.summary()
    assert "10 image(s) usable" in summary and "12 per epoch" in summary and "tiny.png" in summary
    assert report.tag_frequency()["data"]["sks"] == 9


def test_trigger_word_not_duplicated(tmp_path):
    _img(tmp_path / "a.png", caption="photo of SKS dog")
    _img(tmp_path / "b.png", colour=(1, 1, 1), caption="sksx dog")
    items, _ = _by_name(scan(tmp_path, trigger_word="sks"))
    assert items["a.png"].caption == "photo of SKS dog"
    assert items["b.png"].caption == "sks, sksx dog"


def test_scan_file_list(tmp_path):
    a = _img(tmp_path / "a.png", caption="a")
    b = _img(tmp_path / "b b.jpg", colour=(0, 0, 9))
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    report = scan([a, str(b), tmp_path / "gone.png", tmp_path / "a.txt", tmp_path / "notes.md"], repeats=2)
    items, problems = _by_name(report)
    assert set(items) == {"a.png", "b b.jpg"} and items["a.png"].repeats == 2
    assert "unreadable" in problems["gone.png"] and "unsupported" in problems["notes.md"]
    assert "a.txt" not in problems  # captions given with the images are fine


def test_empty_missing_and_all_bad_folders(tmp_path):
    empty = tmp_path / "empty folder"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty folder"):
        scan(empty)
    with pytest.raises(DatasetError, match="not found"):
        scan(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="x.png"):
        scan(bad)


def test_decompression_bombs_skipped(tmp_path, monkeypatch):
    _img(tmp_path / "ok.png", caption="ok")
    _img(tmp_path / "big.png", size=(300, 300), colour=(0, 0, 0), caption="big")
    monkeypatch.setattr(dataset, "MAX_PIXELS", 200 * 200)
    items, problems = _by_name(scan(tmp_path))
    assert "too_large" in problems["big.png"] and set(items) == {"ok.png"}
    _img(tmp_path / "medium.png", size=(120, 120), colour=(0, 9, 0), caption="medium")
    monkeypatch.setattr(dataset, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # PIL's guard: warning above, error above 2x
    items, problems = _by_name(scan(tmp_path))
    assert "too_large" in problems["big.png"] and "too_large" in problems["medium.png"]
    assert set(items) == {"ok.png"}


def test_load_image_modes(messy):
    for name in ["good.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png", "legacy.bmp"]:
        img = load_image(messy / name)
        assert img.mode == "RGB", name
    assert load_image(messy / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(messy / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(messy / "deep.png").getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white
    r, g, b = load_image(messy / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    with pytest.raises(DatasetError, match="truncated.jpg"):
        load_image(messy / "truncated.jpg")


def test_exif_rotation_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((0, 0, 19, 19), fill=(255, 0, 0))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    item = scan(tmp_path, default_caption="x", min_side=8).items[0]
    assert (item.width, item.height) == (20, 40)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert len(scan(tmp_path).items) == 1
    r, g, b = load_image(tmp_path / "anim.gif").getpixel((10, 10))
    assert r > 200 and b < 60


@pytest.mark.parametrize("resolution", [64, 512, 768, 1024])
def test_buckets_cover_aspects_within_area(resolution):
    buckets = dataset.make_buckets(resolution, resolution // 2, resolution * 2, 64)
    assert buckets and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= resolution * resolution
        assert max(64, resolution // 2) <= min(w, h) and max(w, h) <= resolution * 2
    side = resolution // 64 * 64
    assert (side, side) in buckets
    if resolution >= 512:
        assert max(w / h for w, h in buckets) >= 3.5 and min(w / h for w, h in buckets) <= 1 / 3.5
        assert min(w * h for w, h in buckets) >= 0.8 * resolution**2
    assert dataset.assign_bucket(300, 300, buckets) == (side, side)
    if resolution >= 512:
        wide, tall = dataset.assign_bucket(1600, 900, buckets), dataset.assign_bucket(900, 1600, buckets)
        assert wide[0] > wide[1] and tall == wide[::-1]


def test_bucket_batches_one_epoch():
    items = [Item(dataset.Path(f"{i}.png"), "c", 1 + i % 2, 800 if i % 3 else 512, 512, str(i)) for i in range(9)]
    buckets = dataset.make_buckets(512, 256, 1024)
    batches = dataset.bucket_batches(items, buckets, 2, random.Random(0))
    assert sum(len(b) for _, b in batches) == sum(i.repeats for i in items)
    for bucket, batch in batches:
        assert 1 <= len(batch) <= 2
        assert all(dataset.assign_bucket(i.width, i.height, buckets) == bucket for i in batch)
    assert batches == dataset.bucket_batches(items, buckets, 2, random.Random(0))


def test_prepare_shape_range_and_crop():
    img = Image.effect_noise((300, 200), 80).convert("RGB")
    p = dataset.prepare(img, (128, 128))
    assert p.array.shape == (3, 128, 128) and p.array.dtype == np.float32
    assert -1.0 <= p.array.min() and p.array.max() <= 1.0 and p.array.std() > 0.05
    assert p.original_size == (200, 300) and p.target_size == (128, 128)
    assert p.crop_top_left == (0, (192 - 128) // 2)
    wide = dataset.prepare(img, (192, 64), flip=True)
    assert wide.array.shape == (3, 64, 192) and wide.target_size == (64, 192)
    plain = dataset.prepare(img, (192, 64))
    np.testing.assert_array_equal(wide.array, plain.array[:, :, ::-1])


def test_caption_processing():
    caption = "sks, red, blue, green, yellow, purple"
    rng = random.Random(0)
    outs = {dataset.process_caption(caption, shuffle=True, keep_tokens=2, rng=rng) for _ in range(30)}
    assert len(outs) > 1
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "red"] and sorted(tags) == sorted(caption.split(", "))
    assert dataset.process_caption(caption, rng=rng) == caption
    assert dataset.process_caption(caption, dropout=1.0, rng=rng) == ""
    dropped = [dataset.process_caption(caption, dropout=0.5, rng=random.Random(i)) == "" for i in range(200)]
    assert 60 < sum(dropped) < 140


def test_cache_key_changes_with_inputs():
    item = Item(dataset.Path("a.png"), "c", 1, 64, 64, "ab" * 32)
    key = dataset.cache_key(item, (64, 64), False, "demo")
    assert key == dataset.cache_key(item, (64, 64), False, "demo")
    others = {dataset.cache_key(item, (64, 128), False, "demo"), dataset.cache_key(item, (64, 64), True, "demo"),
              dataset.cache_key(item, (64, 64), False, "tiny:sd1")}
    assert key not in others and len(others) == 3


def test_disk_cache_round_trip_and_corruption(tmp_path):
    cache = DiskCache(tmp_path / "cache")
    assert cache.get("k1") is None
    tensors = {"latent": torch.randn(4, 8, 8), "flip": torch.tensor(1)}
    cache.put("k1", tensors)
    got = cache.get("k1")
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1.safetensors"]
    (tmp_path / "cache" / "k1.safetensors").write_bytes(b"\x10\x00garbage")
    assert cache.get("k1") is None
    assert not (tmp_path / "cache" / "k1.safetensors").exists()
    with pytest.raises(ValueError):
        cache.get("../escape")


def test_example_dataset_scans(tmp_path):
    paths = dataset.write_example_dataset(tmp_path / "ex", n=6, size=64, seed=0)
    assert len(paths) == 6
    report = scan(tmp_path / "ex")
    assert len(report.items) == 6 and not report.problems
    assert report.items[0].caption == "a red circle on a white background"
    assert all(i.width == i.height == 64 for i in report.items)
    again = dataset.write_example_dataset(tmp_path / "ex2", n=6, size=64, seed=0)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
