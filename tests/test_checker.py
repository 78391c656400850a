"""The procedural checker reads demo-world images, rendered or degraded, held-out concepts included."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lora_core import checker
from lora_core import demo_world as w


@pytest.fixture(scope="module")
def fresh():
    """300 scenes of every concept (held-out ones too) from a seed no other test uses."""
    images, _, scenes = w.make_batch(300, seed=424242, heldout=True)
    return list(images), scenes


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roughly what a small diffusion model's VAE gives back: a little blur and noise."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    return np.clip(blurred + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def test_accuracy_on_fresh_images(fresh):
    images, scenes = fresh
    found = [checker.detect(im) for im in images]
    for key in ("shape", "colour", "background", "pattern", "size", "position"):
        rate = np.mean([getattr(d, key) == getattr(s, key) for d, s in zip(found, scenes, strict=True)])
        assert rate >= 0.95, (key, rate)


def test_accuracy_on_heldout_concepts(fresh):
    images, scenes = fresh
    for key, concept in [("shape", "star"), ("shape", "heart"), ("colour", "pink"), ("pattern", "stripes")]:
        pairs = [(im, s) for im, s in zip(images, scenes, strict=True) if getattr(s, key) == concept]
        assert len(pairs) >= 10, concept
        assert checker.score([im for im, _ in pairs], [s for _, s in pairs], keys=(key,)) >= 0.95, concept
    # and nothing else is mistaken for them
    found = [checker.detect(im) for im in images]
    for key, concept in [("shape", "star"), ("colour", "pink"), ("pattern", "stripes")]:
        false = [getattr(d, key) == concept != getattr(s, key) for d, s in zip(found, scenes, strict=True)]
        assert np.mean(false) <= 0.02, concept


def test_accuracy_on_degraded_images(fresh):
    images, scenes = fresh
    rng = np.random.default_rng(0)
    noisy = [_degrade(im, rng) for im in images[:150]]
    assert checker.score(noisy, scenes[:150]) >= 0.95
    assert checker.score(noisy, scenes[:150], keys=("pattern",)) >= 0.95


def test_plain_image_has_no_shape():
    blank = np.full((64, 64, 3), w.PALETTE["blue"], dtype=np.uint8)
    assert checker.detect(blank).shape == "none"
    assert checker.detect(Image.fromarray(blank)).background == "blue"


def test_any_size_is_accepted():
    scene = w.Scene("triangle", "yellow", "purple", "large", "centre", radius=0.28)
    found = checker.detect(w.render(scene, size=128))
    assert (found.shape, found.colour, found.background) == ("triangle", "yellow", "purple")


def test_score_checks_its_inputs():
    with pytest.raises(ValueError):
        checker.score([np.zeros((64, 64, 3), np.uint8)], [])
    assert checker.score([], []) == 0.0
