"""Training batches: scanned images -> cached VAE latents -> (latents, captions, SDXL time ids) per step.

Every random choice of a step (batch order, flips, caption shuffle/dropout) is a pure function of
(seed, step), so a resumed run draws exactly what a straight run would.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .dataset import (
    DatasetReport,
    DiskCache,
    Item,
    bucket_batches,
    cache_key,
    load_image,
    make_buckets,
    prepare,
    process_caption,
    scan,
)
from .models import LoadedModel
from .text_ids import encode_text

log = logging.getLogger(__name__)


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, h, w], already scaled by the VAE scaling factor
    captions: list[str]
    time_ids: torch.Tensor  # [B, 6] SDXL: original size, crop top-left, target size


class TrainData:
    """Images of one run, their latents (encoded once) and the per-step batch order."""

    def __init__(self, cfg: TrainConfig, model: LoadedModel, device: torch.device, cache_dir: Path | None):
        d = cfg.data
        self.cfg, self.model, self.device = cfg, model, device
        self.report: DatasetReport = scan(d.dir, trigger_word=d.trigger_word, default_caption=d.default_caption,
                                          repeats=d.repeats, min_side=min(64, d.resolution))
        lo, hi = cfg.data.bucket_range()
        self.buckets = make_buckets(d.resolution, lo, hi, d.bucket_step) if d.buckets \
            else [(d.resolution, d.resolution)]
        self.disk = DiskCache(cache_dir) if (cache_dir and d.cache_to_disk) else None
        self._latents: dict[tuple[str, bool], tuple[torch.Tensor, tuple]] = {}
        self._sizes: dict[tuple, torch.Tensor] = {}  # SDXL size triples on the device
        self._epochs: dict[int, list] = {}
        self.batches_per_epoch = len(self._epoch(0))

    @property
    def items(self) -> list[Item]:
        return self.report.items

    def _epoch(self, epoch: int) -> list[tuple[tuple[int, int], list[Item]]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: self._order(epoch)}
        return self._epochs[epoch]

    def _order(self, epoch: int) -> list[tuple[tuple[int, int], list[Item]]]:
        return bucket_batches(self.items, self.buckets, self.cfg.schedule.batch_size,
                              random.Random(self.cfg.schedule.seed * 7919 + epoch))

    def batch_shapes(self, indices: Iterable[int], limit: int = 100_000) -> list[tuple[int, int, int]]:
        """The distinct shapes, as (images, height, width) in pixels, of the micro-batches numbered `indices`
        (as `batch` numbers them), looked at until every shape an epoch has is met or `limit` batches are
        looked at. Every epoch has the same shapes (each bucket holds the same images), in another order."""
        every = {(len(group), bucket[1], bucket[0]) for bucket, group in self._order(0)}
        seen, order = set(), {}
        for k, index in enumerate(indices):
            if k >= limit or seen == every:
                break
            epoch, pos = divmod(index, self.batches_per_epoch)
            order = order if epoch in order else {epoch: self._order(epoch)}
            bucket, group = order[epoch][pos]
            seen.add((len(group), bucket[1], bucket[0]))
        return sorted(seen)

    @torch.no_grad()
    def _encode(self, item: Item, bucket: tuple[int, int], flip: bool) -> tuple[torch.Tensor, tuple]:
        """One image's latent [4, h, w] (the distribution's mean, scaled) and its SDXL size triple."""
        key = (item.sha256, flip)
        if key in self._latents:
            return self._latents[key]
        prep = prepare(load_image(item.path), bucket, flip=flip)
        sizes = (*prep.original_size, *prep.crop_top_left, *prep.target_size)
        disk_key = cache_key(item, bucket, flip, self.model.name)
        cached = self.disk.get(disk_key) if self.disk else None
        if cached is None:
            vae = self.model.pipe.vae
            x = torch.from_numpy(prep.array)[None].to(self.device, vae.dtype)
            lat = (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)[0].float()
            if self.disk:
                self.disk.put(disk_key, {"latent": lat})
        else:
            lat = cached["latent"].to(self.device)
        if self.cfg.data.cache_latents:
            self._latents[key] = (lat, sizes)
        return lat, sizes

    def warm_cache(self) -> None:
        """Encode every image (and its mirror when flipping) once, before the loop starts."""
        if not self.cfg.data.cache_latents:
            return
        for bucket, group in self._epoch(0):
            for item in group:
                for flip in ((False, True) if self.cfg.data.flip else (False,)):
                    self._encode(item, bucket, flip)

    def batch(self, index: int, rng: random.Random) -> Batch:
        """Micro-batch number `index` (counted over the whole run, epochs back to back)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        bucket, group = self._epoch(epoch)[pos]
        d = self.cfg.data
        lats, caps, sizes = [], [], []
        for item in group:
            lat, size = self._encode(item, bucket, d.flip and rng.random() < 0.5)
            lats.append(lat)
            sizes.append(size)
            caps.append(process_caption(item.caption, shuffle=d.shuffle_tags, keep_tokens=d.keep_tokens,
                                        dropout=d.caption_dropout, rng=rng))
        return Batch(torch.stack(lats), caps, torch.stack([self._size_tensor(s) for s in sizes]))

    def _size_tensor(self, sizes: tuple) -> torch.Tensor:
        """An image's SDXL size triple on the device, made once: a copy from the host at every step would
        make the host wait for the GPU (a pageable copy synchronises), so it could never run ahead."""
        if sizes not in self._sizes:
            self._sizes[sizes] = torch.tensor(sizes, dtype=torch.float32, device=self.device)
        return self._sizes[sizes]


class TextCache:
    """Embeddings per caption, for runs that do not train the text encoder."""

    def __init__(self, model: LoadedModel, clip_skip: int, before_encode=None) -> None:
        self.model, self.clip_skip = model, clip_skip
        self.before_encode = before_encode  # called before the text encoder runs (brings it back if parked)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            if self.before_encode:
                self.before_encode()
            embeds, pooled = encode_text(self.model, missing, self.clip_skip)
            for i, c in enumerate(missing):
                self._cache[c] = (embeds[i], None if pooled is None else pooled[i])
        embeds = torch.stack([self._cache[c][0] for c in captions])
        pooled = None if self.model.family != "sdxl" else torch.stack([self._cache[c][1] for c in captions])
        return embeds, pooled
