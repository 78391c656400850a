"""Our text encoding (tokens on the host, encoders on the device) computes the pipeline's prompt
embeddings, and clip skip takes the layer below the last as a shortened encoder would."""

import copy

import pytest
import torch

from lora_core.models import load_model
from lora_core.text_ids import encode_ids, encode_text, token_ids

CAPTIONS = ["a small red sks heart on a blue background, top left", "", "a cat " * 60]  # the last is truncated


def _pipeline(model, captions, clip_skip):
    skip = clip_skip - 1 if clip_skip > 1 else None
    if model.family == "sdxl":
        embeds, _, pooled, _ = model.pipe.encode_prompt(prompt=captions, device=torch.device("cpu"),
                                                        num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                        clip_skip=skip)
        return embeds, pooled
    return model.pipe.encode_prompt(captions, torch.device("cpu"), 1, False, clip_skip=skip)[0], None


@pytest.mark.parametrize("base", ["tiny:sd1", "tiny:sd2-v", "tiny:sdxl"])
def test_encoding_equals_the_pipelines(base):
    model = load_model(base)
    skips = [1, 2] if base == "tiny:sdxl" else [1]  # diffusers' SD1/SD2 clip skip fails on transformers 5
    with torch.no_grad():
        for clip_skip in skips:
            expected, expected_pooled = _pipeline(model, CAPTIONS, clip_skip)
            embeds, pooled = encode_ids(model, token_ids(model, CAPTIONS, torch.device("cpu")), clip_skip)
            assert torch.equal(embeds, expected)
            assert (pooled is None) == (expected_pooled is None)
            assert pooled is None or torch.equal(pooled, expected_pooled)


def test_clip_skip_2_is_the_encoder_without_its_last_layer():
    model = load_model("tiny:sd1")
    short = copy.deepcopy(model)
    layers = short.text_encoders[0].encoder.layers
    short.text_encoders[0].encoder.layers = layers[:-1]
    with torch.no_grad():
        skipped, _ = encode_text(model, CAPTIONS, clip_skip=2)
        shortened, _ = encode_text(short, CAPTIONS, clip_skip=1)
    torch.testing.assert_close(skipped, shortened, rtol=0, atol=1e-6)
