"""The demo world: deterministic scenes, images and captions; held-out concepts; example folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_core import demo_world as w
from lora_core.tokenizer import make_tokenizer


def test_make_batch_is_deterministic_and_shaped():
    a_imgs, a_caps, a_scenes = w.make_batch(20, seed=3)
    b_imgs, b_caps, b_scenes = w.make_batch(20, seed=3)
    c_imgs, _, _ = w.make_batch(20, seed=4)
    assert a_imgs.shape == (20, 64, 64, 3) and a_imgs.dtype == np.uint8
    assert np.array_equal(a_imgs, b_imgs) and a_caps == b_caps and a_scenes == b_scenes
    assert not np.array_equal(a_imgs, c_imgs)


def test_caption_says_everything():
    scene = w.Scene("circle", "red", "blue", "small", "top left")
    assert w.caption(scene) == "a small red circle on a blue background, top left"
    assert w.caption(scene, size=False, position=False) == "a red circle on a blue background"
    striped = w.Scene("heart", "green", "orange", "large", "centre", "stripes")
    assert w.caption(striped) == "a large green heart with stripes on an orange background, centre"


def test_render_draws_the_scene():
    scene = w.Scene("square", "red", "white", "large", "centre", radius=0.28)
    arr = np.asarray(w.render(scene))
    assert arr.shape == (64, 64, 3)
    assert tuple(arr[0, 0]) == w.PALETTE["white"] and tuple(arr[32, 32]) == w.PALETTE["red"]
    corner = np.asarray(w.render(w.Scene("circle", "blue", "white", "small", "top left", radius=0.15)))
    assert tuple(corner[18, 18]) == w.PALETTE["blue"] and tuple(corner[46, 46]) == w.PALETTE["white"]


def test_training_batches_never_show_heldout_concepts():
    _, captions, scenes = w.make_batch(500, seed=0)
    words = {word for c in captions for word in c.replace(",", "").split()}
    assert not words & w.HELDOUT_WORDS
    assert {s.shape for s in scenes} == set(w.TRAIN_SHAPES)
    assert {s.colour for s in scenes} <= set(w.TRAIN_COLOURS) and {s.pattern for s in scenes} == {"solid"}
    _, _, every = w.make_batch(500, seed=0, heldout=True)
    assert {s.shape for s in every} == set(w.SHAPES) and {s.pattern for s in every} == set(w.PATTERNS)


def test_colours_that_touch_contrast():
    for s in w.make_batch(300, seed=1, heldout=True)[2]:
        assert w.distance(w.PALETTE[s.colour], w.PALETTE[s.background]) >= w.MIN_CONTRAST
        if s.pattern == "stripes":
            assert w.distance(w.stripe_rgb(s.colour), w.PALETTE[s.background]) >= w.MIN_CONTRAST


def test_every_caption_word_is_a_known_tokenizer_word():
    from lora_core.tokenizer import COMMON_WORDS

    _, captions, _ = w.make_batch(300, seed=2, heldout=True)
    words = {word for c in captions for word in c.replace(",", "").split()} | {w.TRIGGER}
    assert words <= set(COMMON_WORDS)


def test_every_caption_word_is_one_token():
    tok = make_tokenizer()
    _, captions, _ = w.make_batch(300, seed=2, heldout=True)
    words = sorted({word for c in captions for word in c.replace(",", "").split()} | {w.TRIGGER})
    assert [x for x in words if tok.tokenize(x) != [x + "</w>"]] == []


@pytest.mark.parametrize("concept", w.CONCEPTS)
def test_write_concept_examples(tmp_path, concept):
    paths = w.write_concept_examples(tmp_path / concept, concept, n=3, seed=5)
    assert [p.name for p in paths] == [f"{concept}_{i:02d}.png" for i in range(3)]
    for p in paths:
        text = p.with_suffix(".txt").read_text().strip()
        assert f"{w.TRIGGER} {concept}" in text, text
    again = w.write_concept_examples(tmp_path / "again", concept, n=3, seed=5)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_bundled_examples_match_the_generator(tmp_path):
    root = Path(__file__).resolve().parents[1] / "assets" / "examples"
    assert (root / "README.md").is_file()
    for concept, fresh in w.write_all_examples(tmp_path).items():
        assert len(fresh) == 8
        for path in fresh:
            bundled = root / concept / path.name
            assert bundled.is_file(), bundled
            assert bundled.with_suffix(".txt").read_text() == path.with_suffix(".txt").read_text()
            assert np.array_equal(np.asarray(Image.open(bundled)), np.asarray(Image.open(path)))


@pytest.mark.slow
def test_train_demo_base_smoke(tmp_path):
    """The GPU training script, at tiny sizes on CPU: a pipeline folder diffusers loads and samples from."""
    import json
    import subprocess
    import sys

    import torch
    from diffusers import StableDiffusionPipeline

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(root / "tools" / "train_demo_base.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=root, capture_output=True, timeout=120)
    report = json.loads((out / "eval.json").read_text())
    assert 0.0 <= report["train_concepts"]["shape+colour"] <= 1.0 and report["weights_mb"] < 30
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32  # fp16 on disk, fp32 by default
    image = pipe("a small red circle on a blue background, top left", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
