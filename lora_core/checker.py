"""A procedural detector for demo-world images: what shape, colour, background, fill, size and place.

No learned weights; analysis by synthesis. The background is the median colour of the image's border.
The fill colour is the commonest palette colour among the pixels that clearly differ from it; the
foreground is every pixel nearer to the fill (or to its dark stripe colour) than to the background,
cleaned by a 3x3 majority vote and a closing, reduced to its largest connected part. The shape is the
one whose mask, drawn by demo_world's own code into the foreground's bounding box (a few sizes and
blurs tried, cut at 50% like the image), overlaps the foreground best. The colour is that of the
interior's brighter half; the fill is "stripes" when a good share of the interior is much darker.
Works on generated (blurry, noisy) images as well as rendered ones; `score` gives a success rate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .demo_world import MIN_CONTRAST, PALETTE, SHAPES, STRIPE_VALUE, Scene, draw_shape

log = logging.getLogger(__name__)

SIDE = 64  # images are analysed at this size
SCALES = (1.0, 1.1, 1.2)  # radius multipliers tried when fitting a shape to the foreground's box
BLURS = (0.0, 0.8, 1.4)  # Gaussian blurs (pixels) tried when fitting
FINALISTS = 3  # shapes that get the full search over SCALES x BLURS
_SS = 4  # supersampling of synthesized masks
FG_THRESHOLD = 40.0  # RGB distance from the background above which a pixel is foreground
LARGE_SIDE = 25  # a bounding box whose longer side has at least this many pixels (at 64) is "large"
CORNER_OFFSET = 5.5  # pixels from the image centre beyond which (on both axes) the place is a corner
STRIPE_SHARE = 0.12  # share of dark interior pixels above which the fill is "stripes"
STRIPE_DARKNESS = 0.75  # "dark": luma below this share of the bright half's median luma ...
STRIPE_GAP = 25.0  # ... and more than this below it (noise on a black fill is no stripe)

_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], dtype=np.float32)  # (C, 3)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    shape: str  # a demo_world shape, or "none" when nothing stands out from the background
    colour: str
    background: str
    pattern: str  # "solid" | "stripes"
    size: str  # "small" | "large"
    position: str  # "centre" | "top left" | ...
    match: float  # IoU (0..1) of the foreground with the chosen shape's synthesized mask


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each row of rgb (N, 3)."""
    return np.argmin(((rgb[:, None, :] - _RGB[None]) ** 2).sum(-1), axis=1)


@lru_cache(maxsize=1)
def unit_boxes() -> dict[str, tuple[float, float, float, float]]:
    """Each shape's bounding box (x0, y0, x1, y1) at radius 1 around the origin."""
    out = {}
    for shape in SHAPES:
        mask = Image.new("L", (512, 512), 0)
        draw_shape(ImageDraw.Draw(mask), shape, 256, 256, 200)
        ys, xs = np.nonzero(np.asarray(mask) > 127)
        out[shape] = ((xs.min() - 256) / 200, (ys.min() - 256) / 200, (xs.max() + 1 - 256) / 200,
                      (ys.max() + 1 - 256) / 200)
    return out


@lru_cache(maxsize=65536)
def synthesize(shape: str, box: tuple[int, int, int, int], scale: float, blur: float) -> np.ndarray:
    """The mask of `shape` drawn to fill `box` (x0, y0, x1, y1) times `scale`, blurred, cut at 50%."""
    ux0, uy0, ux1, uy1 = unit_boxes()[shape]
    x0, y0, x1, y1 = box
    r = scale * ((x1 - x0) / (ux1 - ux0) + (y1 - y0) / (uy1 - uy0)) / 2
    cx, cy = (x0 + x1) / 2 - (ux0 + ux1) / 2 * r, (y0 + y1) / 2 - (uy0 + uy1) / 2 * r
    mask = Image.new("L", (SIDE * _SS, SIDE * _SS), 0)
    draw_shape(ImageDraw.Draw(mask), shape, cx * _SS, cy * _SS, r * _SS)
    mask = mask.reduce(_SS)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return _close(np.asarray(mask) > 127)


def _fit(mask: np.ndarray) -> tuple[str, float]:
    """The shape (and its IoU) whose synthesized mask best matches `mask`: every shape at a middle size
    and blur, then the best few over all sizes and blurs."""
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    def iou(shape: str, scale: float, blur: float) -> float:
        synth = synthesize(shape, box, scale, blur)
        return float((synth & mask).sum() / max(1, (synth | mask).sum()))

    rough = sorted(SHAPES, key=lambda s: -iou(s, SCALES[1], BLURS[1]))[:FINALISTS]
    scored = [(max(iou(s, scale, blur) for scale in SCALES for blur in BLURS), s) for s in rough]
    best_iou, best = max(scored)
    return best, best_iou


def _majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: removes speckle, fills pinholes."""
    p = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    votes = sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return votes >= 5


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component (labels spread by max-propagation until stable)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation (separable: rows, then columns)."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _close(mask: np.ndarray) -> np.ndarray:
    """3x3 closing: bridges gaps of up to 2 pixels (the dark stripes of a striped fill)."""
    return _erode(_dilate(mask))


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _place(mask: np.ndarray) -> tuple[str, str]:
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    cx, cy = (xs.min() + xs.max() + 1) / 2 - SIDE / 2, (ys.min() + ys.max() + 1) / 2 - SIDE / 2
    size = "large" if extent >= LARGE_SIDE else "small"
    if abs(cx) < CORNER_OFFSET or abs(cy) < CORNER_OFFSET:
        return size, "centre"
    return size, f"{'top' if cy < 0 else 'bottom'} {'left' if cx < 0 else 'right'}"


def _fill(pixels: np.ndarray, bg: np.ndarray) -> tuple[str, str]:
    """Colour and pattern of the interior pixels (N, 3): the colour of the brighter half (stripes are
    dark), and "stripes" when a good share is much darker than that."""
    luma = pixels @ _LUMA
    bright = luma >= np.median(luma)
    colour = int(_nearest(np.median(pixels[bright], axis=0)[None])[0])
    top = float(np.median(luma[bright]))
    dark = (luma < STRIPE_DARKNESS * top) & (luma < top - STRIPE_GAP)
    striped = dark.mean() > STRIPE_SHARE and _may_be_striped(_NAMES[colour], bg)
    return _NAMES[colour], "stripes" if striped else "solid"


def _may_be_striped(colour: str, bg: np.ndarray) -> bool:
    """The world's rule: striped fills are colourful and their dark stripes stand out from the background."""
    dark = np.array(PALETTE[colour], dtype=np.float32) * STRIPE_VALUE
    return colour not in ("black", "grey", "white") and float(np.linalg.norm(dark - bg)) >= 0.8 * MIN_CONTRAST


def _foreground(arr: np.ndarray, bg: np.ndarray) -> np.ndarray | None:
    """Pixels nearer to the fill colour (or to its dark stripe colour) than to the background, cleaned:
    3x3 majority, 3x3 closing, largest connected part. None when nothing stands out."""
    dist_bg = np.linalg.norm(arr - bg, axis=-1)
    candidates = arr[dist_bg > FG_THRESHOLD]
    if len(candidates) < 4:
        return None
    nearest = _nearest(candidates)
    name = int(np.bincount(nearest).argmax())
    fill = np.median(candidates[nearest == name], axis=0)
    to_fill = np.linalg.norm(arr - fill, axis=-1)
    if _may_be_striped(_NAMES[name], bg):
        to_fill = np.minimum(to_fill, np.linalg.norm(arr - fill * STRIPE_VALUE, axis=-1))
    nearer_fg = to_fill < dist_bg
    mask = _close(_majority(nearer_fg & (dist_bg > FG_THRESHOLD / 2)))
    return _largest_component(mask) if mask.any() else None


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Detect the one shape of a demo-world image (PIL image or uint8 HxWx3 array, any size)."""
    arr = _as_array(image)
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                             arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _NAMES[int(_nearest(bg[None])[0])]
    mask = _foreground(arr, bg)
    if mask is None:
        return Detection("none", "none", background, "solid", "small", "centre", 0.0)
    shape, iou = _fit(mask)
    core = _erode(mask)
    colour, pattern = _fill(arr[core if core.sum() >= 4 else mask], bg)
    size, position = _place(mask)
    return Detection(shape, colour, background, pattern, size, position, iou)


def matches(detection: Detection, expected: Scene, keys: Sequence[str] = ("shape", "colour")) -> bool:
    return all(getattr(detection, k) == getattr(expected, k) for k in keys)


def score(images: Sequence[Image.Image | np.ndarray], expected: Sequence[Scene],
          keys: Sequence[str] = ("shape", "colour")) -> float:
    """Share of images whose detection agrees with the expected scene on every one of `keys`."""
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expected scenes")
    if not images:
        return 0.0
    hits = sum(matches(detect(img), exp, keys) for img, exp in zip(images, expected, strict=True))
    return hits / len(images)
