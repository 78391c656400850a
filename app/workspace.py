"""The app's folder on disk, so a page reload, a second tab or a restarted server finds everything again.

    $LORA_STUDIO_HOME (default ./workspace)
      dataset/          images + same-stem .txt captions being prepared in the Dataset tab
      runs/RUN_ID/      one training run: the trainer's files, `dataset/` (the images it was started
                        with) and `job.json` (the app's record of the job, see jobs.py)
      uploads/models/   base-model checkpoints uploaded in the Train tab
      uploads/adapters/ adapters uploaded in the Generate tab
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lora_core.errors import LoraStudioError

RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}(-[A-Za-z0-9_.-]+)?$")
_CHECKPOINT = re.compile(r"step-(\d+)\.safetensors$")


class AppError(LoraStudioError):
    """A request the app refuses (busy, not allowed, nothing to act on); the message says why."""


def default_home() -> Path:
    """$LORA_STUDIO_HOME, else ./workspace."""
    return Path(os.environ.get("LORA_STUDIO_HOME") or "workspace").expanduser().resolve()


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True if `path`, with symlinks and `..` resolved, is `root` or below it."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | Path | None = None) -> Workspace:
        """The workspace at `root` (default: $LORA_STUDIO_HOME or ./workspace), its folders created."""
        ws = cls(Path(root).expanduser().resolve() if root else default_home())
        for folder in (ws.dataset_dir, ws.runs_dir, ws.models_dir, ws.adapters_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def models_dir(self) -> Path:
        return self.root / "uploads" / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "uploads" / "adapters"

    def new_run_dir(self, name: str = "lora") -> Path:
        """A new, empty runs/YYYYMMDD-HHMMSS-NAME folder (a suffix is added if that second is taken)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "lora"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            run = self.runs_dir / (f"{stamp}-{safe}" if i == 0 else f"{stamp}-{safe}-{i}")
            try:
                run.mkdir(parents=True)
                return run
            except FileExistsError:
                continue
        raise AppError(f"Could not create a new run folder in {self.runs_dir}.")

    def runs(self) -> list[Path]:
        """Run folders, newest first."""
        found = [p for p in self.runs_dir.iterdir() if p.is_dir() and RUN_ID.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def run(self, run_id: str) -> Path:
        """The folder of run `run_id`; refuses names that are not run ids (no paths from the browser)."""
        if not run_id or not RUN_ID.match(run_id) or not (self.runs_dir / run_id).is_dir():
            raise AppError(f"There is no run '{run_id}' in {self.runs_dir}. Pick one from the list.")
        return self.runs_dir / run_id

    def check_file(self, path: str | Path) -> Path:
        """`path` if it lies inside the workspace; refuses anything else (the browser can send any string)."""
        p = Path(path)
        if not p.is_absolute():
            p = self.root / p
        if not is_inside(p, self.root) or not p.is_file():
            raise AppError(f"'{Path(path).name}' is not a file of this workspace. Pick it from the list again.")
        return p.resolve()


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a `step-000200.safetensors` checkpoint, else None."""
    m = _CHECKPOINT.search(Path(path).name)
    return int(m.group(1)) if m else None


def run_adapters(run: Path) -> list[tuple[str, Path]]:
    """(label, file) of a run's final adapter, then its checkpoints newest first."""
    out: list[tuple[str, Path]] = []
    final = run / "adapter.safetensors"
    if final.is_file():
        out.append(("final adapter", final))
    checkpoints = sorted((run / "checkpoints").glob("step-*.safetensors"), reverse=True)
    out += [(f"checkpoint at step {checkpoint_step(p)}", p) for p in checkpoints if checkpoint_step(p) is not None]
    return out


def latest_sample(run: Path) -> Path | None:
    """The newest preview image of a run, if any."""
    samples = sorted((run / "samples").glob("step-*.png"))
    return samples[-1] if samples else None
