"""The dataset being prepared in the Dataset tab: its images, their captions, and a report in plain words.

Captions are same-stem `.txt` files beside the images, written atomically (temp file, then rename), so
a run that hard-linked the images at start keeps the captions it started with.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

from app.workspace import AppError
from lora_core.config import DataConfig
from lora_core.dataset import IMAGE_EXTS, DatasetReport, assign_bucket, make_buckets, scan
from lora_core.errors import DatasetError

log = logging.getLogger(__name__)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in folder, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def image_named(folder: Path, name: str) -> Path:
    """The image `name` of folder; refuses paths (the name comes from the browser)."""
    if not name or Path(name).name != name or not (folder / name).is_file():
        raise AppError(f"There is no image '{name}' in the dataset. Click an image in the gallery first.")
    return folder / name


def read_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return ""
    return txt.read_text(encoding="utf-8-sig", errors="replace").strip()


def write_caption(image: Path, text: str) -> None:
    """Save the caption of image as image.txt (atomically); an empty caption removes the file."""
    txt = image.with_suffix(".txt")
    text = " ".join(text.split())
    if not text:
        txt.unlink(missing_ok=True)
        return
    tmp = txt.with_name(f".{txt.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(txt)


def find_replace(folder: Path, find: str, replace: str) -> int:
    """Replace `find` by `replace` in every caption (exact, case-sensitive); returns how many changed."""
    if not find:
        raise AppError("Type the text to find.")
    changed = 0
    for image in list_images(folder):
        old = read_caption(image)
        if find in old:
            write_caption(image, old.replace(find, replace))
            changed += 1
    return changed


def delete_image(folder: Path, name: str) -> None:
    image = image_named(folder, name)
    image.unlink()
    image.with_suffix(".txt").unlink(missing_ok=True)


def gallery_items(folder: Path) -> list[tuple[str, str]]:
    """(image path, "name: caption") for the gallery."""
    items = []
    for image in list_images(folder):
        caption = read_caption(image) or "(no caption)"
        items.append((str(image), f"{image.name}: {caption[:80]}"))
    return items


def snapshot(folder: Path, dest: Path) -> int:
    """Copy the dataset's images and captions into dest (hard links where possible); returns images."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for image in list_images(folder):
        for src in (image, image.with_suffix(".txt")):
            if src.is_file():
                try:
                    os.link(src, dest / src.name)
                except OSError:
                    shutil.copy2(src, dest / src.name)
        count += 1
    return count


def bucket_counts(report: DatasetReport, data: DataConfig) -> Counter[tuple[int, int]]:
    """How many images (x repeats) land in each (width, height) bucket at this resolution."""
    if not data.buckets:
        side = data.resolution
        return Counter({(side, side): report.images_per_epoch})
    low, high = data.bucket_range()
    buckets = make_buckets(data.resolution, low, high, data.bucket_step)
    counts: Counter[tuple[int, int]] = Counter()
    for item in report.items:
        counts[assign_bucket(item.width, item.height, buckets)] += item.repeats
    return counts


def report_markdown(folder: Path, data: DataConfig) -> str:
    """What training will see, in plain words: usable images, problems, captions, buckets."""
    if not list_images(folder):
        return ("**No images yet.** Drop images (with same-name .txt captions if you have them) or a .zip "
                "above, or click **Load example dataset**.")
    try:
        report = scan(folder, trigger_word=data.trigger_word, default_caption=data.default_caption,
                      repeats=data.repeats)
    except DatasetError as e:
        return f"**Nothing can be trained yet.** {e}"
    skipped = [p for p in report.problems if p.skipped]
    warnings = [p for p in report.problems if not p.skipped]
    lines = [f"**{len(report.items)} image(s) ready**, {report.images_per_epoch} shown per epoch "
             f"(each {data.repeats}x)."]
    if data.trigger_word.strip():
        lines.append(f"Trigger word `{data.trigger_word.strip()}` is put in front of captions that lack it.")
    if skipped:
        lines += ["", f"**Left out ({len(skipped)})**"] + [f"- {p.message}" for p in skipped]
    if warnings:
        lines += ["", f"**Worth a look ({len(warnings)})**"] + [f"- {p.message}" for p in warnings]
    counts = bucket_counts(report, data)
    lines += ["", f"**Buckets at {data.resolution} px** (images are resized to about {data.resolution}x"
              f"{data.resolution} pixels and grouped by shape{'' if data.buckets else '; bucketing is off'})",
              "", "| width x height | images per epoch |", "|---|---|"]
    lines += [f"| {w} x {h} | {n} |" for (w, h), n in sorted(counts.items())]
    return "\n".join(lines)
