"""How often the demo base, with an adapter at a given weight, draws a held-out concept.

The prompts are the concept's own captions (with the trigger word) for fresh random scenes; images are
drawn in one batch per weight with fixed seeds, so weight 0 is exactly the base model's picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .checker import Detection, detect
from .demo_world import HELDOUT, concept_caption, concept_scene
from .inject import set_multiplier
from .lora import LoRAModule
from .models import LoadedModel


def has_concept(d: Detection, concept: str) -> bool:
    """Whether a detection shows the held-out concept (a shape, a colour or a pattern)."""
    kind = next(k for k, words in HELDOUT.items() if concept in words)
    return getattr(d, kind) == concept


def concept_prompts(concept: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [concept_caption(concept_scene(rng, concept), concept) for _ in range(n)]


@torch.no_grad()
def concept_rates(model: LoadedModel, modules: dict[str, LoRAModule], concept: str,
                  weights: Sequence[float], *, n: int = 20, steps: int = 15, guidance: float = 4.0,
                  seed: int = 0) -> dict[float, float]:
    """{weight: fraction of n images in which the checker finds the concept}."""
    prompts = concept_prompts(concept, n, seed)
    rates = {}
    for w in weights:
        set_multiplier(modules, w)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        images = model.pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                            height=model.resolution, width=model.resolution).images
        rates[w] = float(np.mean([has_concept(detect(img), concept) for img in images]))
    set_multiplier(modules, 1.0)
    return rates
