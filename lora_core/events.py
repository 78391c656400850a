"""Typed events that `trainer.train()` yields; the CLI, the UI and `log.jsonl` all consume these."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Event:
    """Base class; `kind` is the event name written to log.jsonl."""

    kind = "event"

    def to_json(self) -> str:
        return json.dumps({"event": self.kind, **asdict(self), "time": round(time.time(), 3)})


@dataclass
class Started(Event):
    kind = "started"
    run_dir: str
    total_steps: int
    start_step: int  # > 0 when resuming
    images: int
    device: str
    config: dict = field(default_factory=dict)


@dataclass
class Step(Event):
    kind = "step"
    step: int
    loss: float
    lr: float
    samples_per_s: float
    eta_s: float


@dataclass
class Sample(Event):
    """Preview images written at `step` (step 0 is the base model before any training)."""

    kind = "sample"
    step: int
    paths: list[str]
    prompts: list[str]
    scales: list[float]


@dataclass
class Saved(Event):
    kind = "saved"
    step: int
    path: str
    final: bool = False


@dataclass
class Finished(Event):
    kind = "finished"
    step: int
    adapter: str
    stopped: bool = False
    seconds: float = 0.0
    digest: str = ""  # SHA-256 of the fp32 LoRA weights: equal on every process of a data-parallel run


@dataclass
class Failed(Event):
    kind = "failed"
    step: int
    message: str  # what went wrong and what to do; the last good checkpoint stays on disk
    checkpoint: str = ""
