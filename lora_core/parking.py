"""Frozen parts a training step does not use wait in CPU memory while the run trains on a GPU.

Once every latent is cached the VAE is idle, and once every caption's embedding is cached (the text
encoder frozen, tags not shuffled) so are the text encoders: together about 0.4 GiB for SD1.5 and 1.7 GiB
for SDXL in bf16. They come back for previews and whenever a caption turns up that isn't cached yet.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .models import LoadedModel

log = logging.getLogger(__name__)


class Parking:
    def __init__(self, model: LoadedModel, device: torch.device, *, vae: bool, text: bool) -> None:
        self.device = device
        parts: list[nn.Module] = []
        if device.type == "cuda":
            parts += [model.pipe.vae] if vae else []
            parts += list(model.text_encoders) if text else []
        self.parts, self.parked = parts, False

    def park(self) -> None:
        if self.parts and not self.parked:
            for part in self.parts:
                part.to("cpu")
            torch.cuda.empty_cache()
            self.parked = True
            log.info("the VAE%s wait in CPU memory while training", " and text encoders" if len(self.parts) > 1 else "")

    def unpark(self) -> None:
        if self.parked:
            for part in self.parts:
                part.to(self.device)
            self.parked = False

    @contextlib.contextmanager
    def back(self) -> Iterator[None]:
        """The parked parts on the GPU inside the block (previews), parked again after it."""
        was = self.parked
        self.unpark()
        try:
            yield
        finally:
            if was:
                self.park()
