"""Training images: scan a folder or upload, load images safely, buckets, captions, latent cache.

Nothing here needs the model. Bad files never raise: they become `Problem`s in the `DatasetReport`
so the UI can show them; only "nothing usable at all" raises `DatasetError`.
"""

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from lora_core.errors import DatasetError

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
OTHER_IMAGE_EXTS = frozenset({".heic", ".heif", ".avif", ".tif", ".tiff", ".jxl", ".svg", ".psd"})
MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
SKIPPED_KINDS = frozenset({"unreadable", "unsupported", "too_large", "too_small", "duplicate"})
CACHE_VERSION = 1  # bump when prepare() or latent encoding changes, so old cache entries miss
_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Item:
    """One usable training image."""

    path: Path
    caption: str
    repeats: int
    width: int  # as displayed, i.e. after EXIF rotation
    height: int
    sha256: str  # of the file bytes


@dataclass
class Problem:
    """Something wrong with one file, in plain words, and what happens to it."""

    path: Path
    kind: str  # unreadable | unsupported | too_large | too_small | duplicate | caption_missing | caption_encoding | converted
    message: str

    @property
    def skipped(self) -> bool:
        """True if the file is left out of training (otherwise it is a warning)."""
        return self.kind in SKIPPED_KINDS


@dataclass
class DatasetReport:
    """Result of `scan`: the usable items and every problem found."""

    items: list[Item]
    problems: list[Problem] = field(default_factory=list)

    @property
    def images_per_epoch(self) -> int:
        """Images shown per epoch: sum of repeats."""
        return sum(item.repeats for item in self.items)

    def summary(self) -> str:
        """A few lines of text for the UI and CLI."""
        skipped = sum(p.skipped for p in self.problems)
        lines = [f"{len(self.items)} image(s) usable, {self.images_per_epoch} per epoch with repeats; "
                 f"{skipped} skipped, {len(self.problems) - skipped} warning(s)."]
        lines += [f"  {'skipped' if p.skipped else 'warning'}: {p.message}" for p in self.problems]
        return "\n".join(lines)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder name: {tag: count}} over comma-separated caption tags (kohya's ss_tag_frequency)."""
        freq: dict[str, Counter[str]] = {}
        for item in self.items:
            tags = [t.strip() for t in item.caption.split(",") if t.strip()]
            freq.setdefault(item.path.parent.name, Counter()).update(tags)
        return {folder: dict(counts) for folder, counts in freq.items()}


class _Skip(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------------
# Loading images


def _open(data: bytes, name: str) -> Image.Image:
    """Open and fully decode an image from its bytes; raise _Skip for anything unreadable or too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise _Skip("too_large", f"{name} is {img.width}x{img.height} pixels, more than the "
                            f"{MAX_PIXELS // 1_000_000} MP limit; it will be skipped. Downscale it first.")
            img.load()
            return img
    except _Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Skip("too_large", f"{name} is too large to decode safely (possible decompression bomb); "
                    "it will be skipped.") from None
    except Image.UnidentifiedImageError:
        raise _Skip("unreadable", f"{name} is not an image that can be read (wrong extension or not an "
                    "image file); it will be skipped.") from None
    except MemoryError:
        raise _Skip("too_large", f"{name} needs more memory to decode than is available; it will be "
                    "skipped. Downscale it first.") from None
    except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error,
        # IndexError, ... for damaged data: every one of them means "this file is corrupt"
        raise _Skip("unreadable", f"{name} could not be decoded ({type(e).__name__}: {e}); it is probably "
                    "truncated or corrupt and will be skipped.") from None


def _describe(img: Image.Image, name: str) -> tuple[int, int, str | None]:
    """(width, height) as displayed and a conversion note; _Skip if the metadata (EXIF) is damaged."""
    try:
        width, height = _upright_size(img)
        return width, height, _conversion_note(img)
    except Exception as e:  # a corrupt EXIF block raises from deep inside PIL
        raise _Skip("unreadable", f"{name} has damaged metadata ({type(e).__name__}: {e}); it will be "
                    "skipped. Re-save it with an image editor.") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16-bit scaled down, CMYK/palette/grey converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)  # float32: a 64 MP 16-bit image stays at 256 MB
        a = a / 257.0 if a.max(initial=0) > 255 else a  # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _conversion_note(img: Image.Image) -> str | None:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return "has transparency; it will be placed on a white background"
    if img.mode == "CMYK":
        return "is CMYK; it will be converted to RGB (colours may shift slightly)"
    if img.mode.startswith("I") or img.mode == "F":
        return "has 16-bit or float pixels; it will be converted to 8-bit RGB"
    return None


def load_image(path: str | Path) -> Image.Image:
    """Load an image as 8-bit RGB, upright (EXIF orientation applied), first frame if animated.

    Raises DatasetError if the file cannot be read; `scan` has already filtered such files out.
    """
    try:
        img = _open(Path(path).read_bytes(), str(path))
    except OSError as e:
        raise DatasetError(f"{path} cannot be read: {e.strerror or e}") from None
    except _Skip as e:
        raise DatasetError(str(e)) from None
    with img:
        try:
            return _to_rgb(ImageOps.exif_transpose(img))
        except Exception as e:  # damaged EXIF or pixel data that only fails on conversion
            raise DatasetError(f"{path} could not be converted to RGB ({type(e).__name__}: {e}); it is "
                               "probably corrupt. Re-save it with an image editor or remove it.") from None


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the sides."""
    orientation = img.getexif().get(0x0112, 1)
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


# ---------------------------------------------------------------------------------------------------
# Scanning


def _read_caption(image: Path, problems: list[Problem]) -> str | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    raw = txt.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        problems.append(Problem(txt, "caption_encoding", f"{txt.name} is not UTF-8; it was read as "
                                "Latin-1. Re-save it as UTF-8 if accents look wrong."))
    return " ".join(text.split()) or None


def _with_trigger(caption: str, trigger: str) -> str:
    trigger = trigger.strip()
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _list_files(folder: Path) -> list[tuple[Path, int | None]]:
    """Files of the folder and of its direct subfolders, with the repeats of `N_name` subfolders."""
    out: list[tuple[Path, int | None]] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            m = _REPEATS_DIR.match(entry.name)
            repeats = max(1, int(m.group(1))) if m else None
            out += [(p, repeats) for p in sorted(entry.iterdir()) if p.is_file() and not p.name.startswith(".")]
        elif entry.is_file():
            out.append((entry, None))
    return out


def _scan_one(path: Path, repeats: int, seen: dict[str, Path], opts: dict, problems: list[Problem]) -> Item:
    data = path.read_bytes()
    if not data:
        raise _Skip("unreadable", f"{path.name} is empty (0 bytes); it will be skipped.")
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        raise _Skip("duplicate", f"{path.name} is an exact copy of {seen[digest].name}; the copy will be "
                    "skipped.")
    with _open(data, path.name) as img:
        width, height, note = _describe(img, path.name)
    if min(width, height) < opts["min_side"]:
        raise _Skip("too_small", f"{path.name} is only {width}x{height} pixels (the shorter side must be at "
                    f"least {opts['min_side']}); it will be skipped.")
    seen[digest] = path
    if note:
        problems.append(Problem(path, "converted", f"{path.name} {note}."))
    caption = _read_caption(path, problems)
    if caption is None:
        caption = opts["default_caption"]
        what = f'the default caption "{caption}"' if caption else "an empty caption"
        problems.append(Problem(path, "caption_missing", f"{path.name} has no caption ({path.stem}.txt "
                                f"missing or empty); it will be trained with {what}."))
    return Item(path, _with_trigger(caption, opts["trigger_word"]), repeats, width, height, digest)


def scan(source: str | Path | Sequence[str | Path], *, trigger_word: str = "", default_caption: str = "",
         min_side: int = 64, repeats: int = 1) -> DatasetReport:
    """Find usable images and their captions in a folder (plus `N_name` subfolders) or a list of files.

    `repeats` applies to images outside `N_name` folders. Problems are reported, never raised; raises
    DatasetError only when the folder is missing or nothing usable is found.
    """
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.is_dir():
            raise DatasetError(f"Dataset folder not found: {folder}. Pass a folder of images "
                               f"({', '.join(IMAGE_EXTS)}) with optional same-name .txt captions.")
        try:
            files = _list_files(folder)
        except OSError as e:
            raise DatasetError(f"Cannot read the dataset folder {folder}: {e.strerror or e}. Check that it "
                               "exists and that you may read it.") from None
        where = f"the folder {folder} and its subfolders"
    else:
        files = [(Path(p), None) for p in source]
        where = f"the {len(files)} file(s) given"
    from_list = not isinstance(source, str | Path)
    opts = {"trigger_word": trigger_word, "default_caption": default_caption.strip(), "min_side": min_side}
    items: list[Item] = []
    problems: list[Problem] = []
    seen: dict[str, Path] = {}
    for path, folder_repeats in files:
        suffix = path.suffix.lower()
        if suffix not in IMAGE_EXTS:
            if suffix in OTHER_IMAGE_EXTS or (from_list and suffix != ".txt"):
                problems.append(Problem(path, "unsupported", f"{path.name}: {suffix or 'no extension'} "
                                        f"is not supported (use {', '.join(IMAGE_EXTS)}); it will be skipped."))
            continue  # captions and unrelated files
        try:
            items.append(_scan_one(path, folder_repeats or repeats, seen, opts, problems))
        except _Skip as e:
            problems.append(Problem(path, e.kind, str(e)))
        except OSError as e:
            problems.append(Problem(path, "unreadable", f"{path.name} cannot be read ({e.strerror or e}); "
                                    "it will be skipped."))
    if not items:
        looked = f"Looked for {', '.join(IMAGE_EXTS)} files in {where}"
        if not problems:
            raise DatasetError(f"No images found. {looked}. Add images (and optional .txt captions).")
        raise DatasetError(f"No usable images. {looked}; every one was skipped:\n"
                           + "\n".join(f"  - {p.message}" for p in problems))
    report = DatasetReport(items, problems)
    logger.info("dataset: %s", report.summary().splitlines()[0])
    return report


# ---------------------------------------------------------------------------------------------------
# Buckets and image preparation


def make_buckets(resolution: int, min_side: int, max_side: int, step: int = 64) -> list[tuple[int, int]]:
    """(width, height) buckets, sides multiples of `step` in [min_side, max_side], area <= resolution^2.

    For each width, the tallest height that fits the area, so every bucket has about the same area.
    Sorted by aspect ratio (tall to wide). Never empty: falls back to one square bucket.
    """
    low = max(step, math.ceil(min_side / step) * step)
    high = max(low, max_side // step * step)
    area = resolution * resolution
    buckets = set()
    for w in range(low, high + 1, step):
        h = min(high, area // w // step * step)
        if h >= low:
            buckets.add((w, h))
            buckets.add((h, w))
    if not buckets:
        side = max(step, resolution // step * step)
        return [(side, side)]
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the nearest aspect ratio (in log space); ties go to the larger bucket."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def bucket_batches(items: Sequence[Item], buckets: Sequence[tuple[int, int]], batch_size: int,
                   rng: random.Random) -> list[tuple[tuple[int, int], list[Item]]]:
    """One epoch: items x repeats grouped by bucket, shuffled, cut into batches, batches shuffled.

    The last batch of a bucket may be smaller than batch_size. len(result) = steps per epoch.
    """
    groups: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        groups.setdefault(assign_bucket(item.width, item.height, buckets), []).extend([item] * item.repeats)
    batches = []
    for bucket in sorted(groups):
        group = groups[bucket]
        rng.shuffle(group)
        batches += [(bucket, group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Prepared:
    """A training image in a bucket. Sizes are (height, width), crop is (top, left): SDXL's order."""

    array: np.ndarray  # float32 (3, H, W) in [-1, 1]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def prepare(image: Image.Image, bucket: tuple[int, int], *, flip: bool = False) -> Prepared:
    """Resize `image` to cover `bucket` (width, height), centre-crop, optionally mirror; CHW in [-1, 1]."""
    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    rw, rh = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    resized = image.convert("RGB").resize((rw, rh), resample)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    crop = resized.crop((left, top, left + bw, top + bh))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - bw - left
    array = (np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    return Prepared(np.ascontiguousarray(array), (image.height, image.width), (top, left), (bh, bw))


# ---------------------------------------------------------------------------------------------------
# Captions


def process_caption(caption: str, *, shuffle: bool = False, keep_tokens: int = 0, dropout: float = 0.0,
                    rng: random.Random) -> str:
    """Per-step caption: empty with probability `dropout`, else tags shuffled after the first keep_tokens."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


# ---------------------------------------------------------------------------------------------------
# Latent cache


def cache_key(item: Item, bucket: tuple[int, int], flip: bool, model_id: str) -> str:
    """Stable key of one cached latent: file content, size, bucket, flip and the model (VAE) used."""
    parts = [CACHE_VERSION, item.sha256, item.width, item.height, list(bucket), bool(flip), model_id]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


class DiskCache:
    """Tensors by key as `.safetensors` files in one folder; writes are atomic, corrupt files are misses."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9A-Za-z_-]+", key):
            raise ValueError(f"cache key must be letters, digits, _ or -: {key!r}")
        return self.dir / f"{key}.safetensors"

    def get(self, key: str) -> "dict[str, Tensor] | None":
        """The tensors stored under key, or None if absent or unreadable (then the file is removed)."""
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error type for bad headers/lengths
            logger.warning("latent cache file %s is corrupt (%s); removing it and re-encoding", path, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: "dict[str, Tensor]") -> None:
        """Store tensors under key (temp file in the same folder, then rename)."""
        from safetensors.torch import save_file

        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------------------
# Example dataset

_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
            "purple": (140, 60, 180), "orange": (245, 140, 30)}
_BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
_SHAPES = ("circle", "square", "triangle")


def write_example_dataset(directory: str | Path, n: int = 6, size: int = 64, seed: int = 0) -> list[Path]:
    """Write n captioned PNGs of coloured shapes (`shape_000.png` + `.txt`); returns the image paths.

    Image 0 is always "a red circle on a white background" (the quick-demo preview prompt).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        if i == 0:
            colour, shape, bg = "red", "circle", "white"
        else:
            colour, shape, bg = rng.choice(list(_COLOURS)), rng.choice(_SHAPES), rng.choice(list(_BACKGROUNDS))
        img = Image.new("RGB", (size, size), _BACKGROUNDS[bg])
        draw = ImageDraw.Draw(img)
        r = size * rng.uniform(0.25, 0.38)
        cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=_COLOURS[colour])
        path = out / f"shape_{i:03d}.png"
        img.save(path)
        path.with_suffix(".txt").write_text(f"a {colour} {shape} on a {bg} background\n", encoding="utf-8")
        paths.append(path)
    return paths
