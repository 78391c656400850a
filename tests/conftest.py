import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*requires torchvision.*")
# The test models are tiny: one thread per process is faster than two fighting over small kernels.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run it through the device tool")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fast_tiny_unet():
    """A callable: `tiny:sd1`'s bf16 UNet on the CPU after `fast_unet` with the given `performance.*`
    overrides, as a training run prepares it."""
    def make(*overrides: str):
        from lora_core.config import resolve
        from lora_core.fast_step import fast_unet
        from lora_core.models import load_model

        model = load_model("tiny:sd1", device=torch.device("cpu"))
        model.unet.to(torch.bfloat16)
        cfg = resolve(overrides=["model.base=tiny:sd1", *overrides], check=False)
        fast_unet(cfg, model, torch.device("cpu"), steps=10, graphs=False)
        return model.unet
    return make
