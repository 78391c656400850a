"""The bundled `demo` base draws what it is asked, and LoRA training on the CPU teaches it a shape it
never saw: the quick-demo preset on the 8 bundled `heart` examples, scored by the procedural checker."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_core import checker, demo_world
from lora_core.concept_eval import concept_prompts, concept_rates
from lora_core.config import resolve
from lora_core.export import apply_adapter, load_adapter
from lora_core.inject import set_multiplier
from lora_core.models import load_model
from lora_core.sampling import draw
from lora_core.trainer import train

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
log = logging.getLogger(__name__)


def _demo():
    model = load_model("demo")
    model.pipe.set_progress_bar_config(disable=True)
    return model


@pytest.mark.slow
def test_demo_base_draws_the_asked_shape_and_colour():
    _, captions, scenes = demo_world.make_batch(100, seed=123)
    model = _demo()
    images = model.pipe(prompt=captions, num_inference_steps=20, guidance_scale=4.0, height=64, width=64,
                        generator=[torch.Generator().manual_seed(i) for i in range(100)]).images
    rate = checker.score(images, scenes)
    log.info("demo base: shape and colour right in %.0f%% of 100 images", 100 * rate)
    assert rate >= 0.80


@pytest.mark.slow
def test_quick_demo_lora_teaches_the_demo_base_a_new_shape(tmp_path, record_property):
    cfg = resolve(preset="quick-demo", overrides=[f"data.dir={EXAMPLES / 'heart'}"])
    events = list(train(cfg, run_dir=tmp_path / "run"))
    done = events[-1]
    assert done.kind == "finished", done
    record_property("training_seconds", done.seconds)
    log.info("quick-demo on 8 heart images: %.0f s of training", done.seconds)

    model = _demo()
    base_images = draw(model, concept_prompts("heart", 3), steps=10)
    modules = apply_adapter(model, load_adapter(Path(done.adapter), model), 1.0)
    rates = concept_rates(model, modules, "heart", [0.0, 0.5, 1.0], n=40, guidance=7.0)
    record_property("heart_rates", rates)
    log.info("hearts drawn at weights 0 / 0.5 / 1: %s", rates)
    assert rates[1.0] >= 0.70 and rates[0.0] <= 0.10
    assert rates[0.0] < rates[0.5] < rates[1.0]  # the weight slider blends the concept in

    set_multiplier(modules, 0.0)  # weight 0: exactly the base model's images
    at_zero = draw(model, concept_prompts("heart", 3), steps=10)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base_images, at_zero, strict=True))
