"""The demo world: captioned 64x64 pictures of one flat shape on a plain background.

A scene is a shape (circle, square, ...) of a colour, size and position, optionally with a striped fill,
on a background colour; its caption says all of it: "a small red circle on a blue background, top left".
Everything is deterministic from a seed and cheap (PIL at 4x supersampling, a few thousand images/s).

The bundled `demo` base model is trained on TRAIN_* concepts only. HELDOUT concepts (a shape, a colour,
a fill pattern) never appear in its training data: they are what a user teaches it with a LoRA, from
the example folders that `write_concept_examples` writes (assets/examples/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "cyan": (40, 200, 220), "white": (250, 250, 250),
    "black": (15, 15, 15), "grey": (128, 128, 128), "pink": (255, 140, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "heart")
PATTERNS = ("solid", "stripes")
SIZES = {"small": (0.13, 0.17), "large": (0.26, 0.30)}  # radius range, as a fraction of the image side
POSITIONS = {"centre": (0, 0), "top left": (-1, -1), "top right": (1, -1),
             "bottom left": (-1, 1), "bottom right": (1, 1)}
_OFFSET = {"small": 0.22, "large": 0.17}  # centre offset of a corner position, fraction of the side

HELDOUT = {"shape": ("star", "heart"), "colour": ("pink",), "pattern": ("stripes",)}
TRAIN_SHAPES = tuple(s for s in SHAPES if s not in HELDOUT["shape"])
TRAIN_COLOURS = tuple(c for c in PALETTE if c not in HELDOUT["colour"])
TRAIN_PATTERNS = ("solid",)
HELDOUT_WORDS = frozenset(w for words in HELDOUT.values() for w in words)
CONCEPTS = ("star", "heart", "pink", "stripes")  # one example folder each
TRIGGER = "sks"
EXAMPLE_SEED = 8  # seed of the bundled example folders (assets/examples/)
MIN_CONTRAST = 90.0  # least RGB distance between any two colours that touch in a picture
STRIPE_VALUE = 0.35  # brightness of the dark stripes of a striped fill, relative to the colour
_SS = 4  # supersampling factor of the renderer


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str  # "small" | "large"
    position: str  # a POSITIONS key
    pattern: str = "solid"
    dx: float = 0.0  # jitter of the centre, fraction of the side
    dy: float = 0.0
    radius: float = 0.15  # fraction of the side

    @property
    def centre(self) -> tuple[float, float]:
        ox, oy = POSITIONS[self.position]
        off = _OFFSET[self.size]
        return 0.5 + ox * off + self.dx, 0.5 + oy * off + self.dy


def distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def stripe_rgb(colour: str) -> tuple[int, int, int]:
    """The dark stripes of a striped fill: the colour at 35% brightness."""
    return tuple(int(c * STRIPE_VALUE) for c in PALETTE[colour])  # type: ignore[return-value]


def _contrasting(colour: str, background: str, pattern: str) -> bool:
    bg = PALETTE[background]
    if colour == background or distance(PALETTE[colour], bg) < MIN_CONTRAST:
        return False
    if pattern == "stripes":  # stripes must stand out from the fill and from the background
        dark = stripe_rgb(colour)
        return colour not in ("black", "grey", "white") and distance(dark, bg) >= MIN_CONTRAST
    return True


def sample_scene(rng: np.random.Generator, *, shapes: tuple[str, ...] = TRAIN_SHAPES,
                 colours: tuple[str, ...] = TRAIN_COLOURS, patterns: tuple[str, ...] = TRAIN_PATTERNS,
                 backgrounds: tuple[str, ...] = TRAIN_COLOURS, size: str | None = None) -> Scene:
    """A random scene over the given concepts (default: the base model's training concepts only); `size`
    fixes the size word, else it is random too."""
    while True:
        shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
        background, pattern = str(rng.choice(backgrounds)), str(rng.choice(patterns))
        if _contrasting(colour, background, pattern):
            break
    size = str(rng.choice(list(SIZES))) if size is None else size
    position = str(rng.choice(list(POSITIONS)))
    dx, dy = (float(v) for v in rng.uniform(-0.025, 0.025, size=2))
    radius = float(rng.uniform(*SIZES[size]))
    return Scene(shape, colour, background, size, position, pattern, dx, dy, radius)


def caption(scene: Scene, *, size: bool = True, position: bool = True) -> str:
    """'a small red circle on a blue background, top left' (size and position words optional)."""
    words = ["a"] + ([scene.size] if size else []) + [scene.colour, scene.shape]
    if scene.pattern == "stripes":
        words += ["with", "stripes"]
    article = "an" if scene.background[0] in "aeiou" else "a"
    text = " ".join(words + ["on", article, scene.background, "background"])
    return f"{text}, {scene.position}" if position else text


def random_caption(scene: Scene, rng: np.random.Generator, p_drop: float = 0.25) -> str:
    """The caption with the size and the position word(s) each left out with probability p_drop."""
    keep_size, keep_pos = rng.random(2) >= p_drop
    return caption(scene, size=bool(keep_size), position=bool(keep_pos))


# ----------------------------------------------------------------------------- drawing


def _star(r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return list(zip((radii * np.cos(angles)).tolist(), (radii * np.sin(angles)).tolist(), strict=True))


Ink = int | tuple[int, int, int]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Ink = 255,
               hole: Ink = 0) -> None:
    """Draw `shape` centred at (cx, cy) with radius r (pixels), upright; `hole` paints the ring's hole."""
    def poly(points: list[tuple[float, float]]) -> None:
        draw.polygon([(cx + x, cy + y) for x, y in points], fill=fill)

    def disc(x: float, y: float, radius: float, value: Ink = fill) -> None:
        draw.ellipse((cx + x - radius, cy + y - radius, cx + x + radius, cy + y + radius), fill=value)

    if shape == "circle":
        disc(0, 0, r)
    elif shape == "square":
        s = 0.85 * r
        poly([(-s, -s), (s, -s), (s, s), (-s, s)])
    elif shape == "triangle":
        poly([(0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)])
    elif shape == "diamond":
        poly([(0, -r), (0.8 * r, 0), (0, r), (-0.8 * r, 0)])
    elif shape == "cross":
        a, w = 0.9 * r, 0.32 * r
        poly([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
              (-a, -w), (-w, -w)])
    elif shape == "ring":
        disc(0, 0, r)
        disc(0, 0, 0.55 * r, hole)
    elif shape == "star":
        poly(_star(r))
    elif shape == "heart":
        disc(-0.45 * r, -0.3 * r, 0.5 * r)
        disc(0.45 * r, -0.3 * r, 0.5 * r)
        poly([(-0.93 * r, -0.12 * r), (0.93 * r, -0.12 * r), (0, 0.95 * r)])
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@lru_cache(maxsize=8)
def _stripe_mask(side: int) -> Image.Image:
    """Diagonal stripes, period 6 px at 64 px: 4 px colour, 2 px dark (255 where dark)."""
    period = side * 6 / 64
    y, x = np.mgrid[0:side, 0:side]
    dark = ((x + y) / np.sqrt(2) % period) >= period * 4 / 6
    return Image.fromarray(dark.astype(np.uint8) * 255)


def _fill(scene: Scene, side: int) -> Image.Image:
    fill = Image.new("RGB", (side, side), PALETTE[scene.colour])
    if scene.pattern == "stripes":
        fill.paste(stripe_rgb(scene.colour), (0, 0, side, side), _stripe_mask(side))
    return fill


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of size x size (antialiased by 4x supersampling)."""
    side = size * _SS
    cx, cy, r = scene.centre[0] * side, scene.centre[1] * side, scene.radius * side
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    if scene.pattern == "solid":
        draw_shape(ImageDraw.Draw(image), scene.shape, cx, cy, r, PALETTE[scene.colour], PALETTE[scene.background])
    else:
        mask = Image.new("L", (side, side), 0)
        draw_shape(ImageDraw.Draw(mask), scene.shape, cx, cy, r)
        image.paste(_fill(scene, side), (0, 0), mask)
    return image.reduce(_SS)


def make_batch(n: int, seed: int, *, size: int = 64, heldout: bool = False,
               **concepts: tuple[str, ...]) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n rendered scenes: uint8 images (n, size, size, 3), full captions, scenes.

    Training concepts only, unless heldout=True (every concept) or `concepts` (shapes=, colours=,
    patterns=, backgrounds=) say otherwise.
    """
    if heldout:
        concepts = dict(shapes=SHAPES, colours=tuple(PALETTE), patterns=PATTERNS) | concepts
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, **concepts) for _ in range(n)]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = np.asarray(render(scene, size))
    return images, [caption(s) for s in scenes], scenes


# ----------------------------------------------------------------------------- held-out concepts


def concept_scene(rng: np.random.Generator, concept: str, size: str | None = None) -> Scene:
    """A random scene showing a held-out concept, everything else from the training concepts."""
    if concept in HELDOUT["shape"]:
        return sample_scene(rng, shapes=(concept,), size=size)
    if concept in HELDOUT["colour"]:
        return sample_scene(rng, colours=(concept,), size=size)
    if concept in HELDOUT["pattern"]:
        return sample_scene(rng, patterns=(concept,), size=size)
    raise ValueError(f"unknown held-out concept {concept!r}; known: {', '.join(CONCEPTS)}")


def concept_caption(scene: Scene, concept: str, trigger: str = TRIGGER) -> str:
    """The full caption with the trigger word put before the concept's word ('a small red sks star ...')."""
    words = caption(scene).split(" ")
    i = words.index(concept)
    return " ".join(words[:i] + [trigger] + words[i:])


def write_concept_examples(directory: str | Path, concept: str, n: int = 8, seed: int = 0,
                           trigger: str = TRIGGER) -> list[Path]:
    """Write n PNGs (64x64) of a held-out concept with `.txt` captions holding the trigger word."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    sizes = list(SIZES)
    for i in range(n):
        scene = concept_scene(rng, concept, size=sizes[i % len(sizes)])  # every size equally often
        path = out / f"{concept}_{i:02d}.png"
        render(scene).save(path, optimize=True)
        path.with_suffix(".txt").write_text(concept_caption(scene, concept, trigger) + "\n", encoding="utf-8")
        paths.append(path)
    log.info("wrote %d examples of '%s' to %s", n, concept, out)
    return paths


def write_all_examples(root: str | Path, n: int = 8, seed: int = EXAMPLE_SEED) -> dict[str, list[Path]]:
    """One folder of examples per held-out concept under root (the bundled assets/examples/)."""
    return {c: write_concept_examples(Path(root) / c, c, n, seed + k) for k, c in enumerate(CONCEPTS)}
