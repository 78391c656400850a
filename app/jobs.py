"""One background training job at a time, its state on disk so a reload, a second tab or a restarted
server finds it again.

`lora_core.trainer.train` is a generator of events (lora_core.events). A worker thread drives it and
folds every event into a `JobState`, which is saved as RUN/job.json (atomically; step updates at most
once a second). UI handlers only read snapshots or wait for the next change; they never touch the
trainer. Stopping is cooperative: the trainer checks a threading.Event between steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.workspace import AppError, Workspace
from lora_core.config import TrainConfig
from lora_core.errors import LoraStudioError
from lora_core.events import Event, Failed, Finished, Sample, Saved, Started, Step

log = logging.getLogger(__name__)

TrainFn = Callable[..., Iterator[Event]]  # train(cfg, stop, *, run_dir, resume) -> events
ACTIVE = ("starting", "running", "stopping")
LOG_LINES = 500
SAVE_EVERY_S = 1.0


@dataclass
class JobState:
    """What the UI shows about a job; also the content of RUN/job.json."""

    run_id: str
    run_dir: str
    base: str = ""
    status: str = "starting"  # starting | running | stopping | finished | stopped | failed | interrupted
    message: str = ""
    total_steps: int = 0
    start_step: int = 0
    step: int = 0
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    device: str = ""
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    adapter: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # Sample events as dicts
    checkpoints: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    version: int = 0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def resumable(self) -> bool:
        """Stopped, failed or interrupted, with the trainer's saved state to continue from."""
        state = Path(self.run_dir) / "state"
        return self.status in ("stopped", "failed", "interrupted") and state.is_dir() and any(state.iterdir())

    def path(self, p: str) -> Path:
        """A file the trainer reported, relative paths taken from the run folder."""
        return Path(p) if Path(p).is_absolute() else Path(self.run_dir) / p

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> JobState:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in names})
        state.losses = [(int(s), float(v)) for s, v in state.losses]
        return state


def describe(event: Event, total: int) -> str:
    """One log line for an event."""
    if isinstance(event, Started):
        what = f"resuming at step {event.start_step}" if event.start_step else "starting"
        return f"{what}: {event.total_steps} steps on {event.device}, {event.images} image(s)"
    if isinstance(event, Step):
        return (f"step {event.step}/{total}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                f"{event.samples_per_s:.2f} samples/s  ETA {format_seconds(event.eta_s)}")
    if isinstance(event, Sample):
        return f"previews at step {event.step}: {len(event.paths)} image(s)"
    if isinstance(event, Saved):
        return f"saved {'final adapter' if event.final else 'checkpoint'} {Path(event.path).name}"
    if isinstance(event, Finished):
        if event.stopped:
            return f"stopped at step {event.step}"
        return f"finished at step {event.step} in {format_seconds(event.seconds)}"
    if isinstance(event, Failed):
        return f"failed at step {event.step}: {event.message}"
    return event.kind


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _default_train() -> TrainFn:
    try:
        from lora_core.trainer import train
    except ImportError as e:
        raise AppError(f"The training engine (lora_core.trainer) is not available: {e}.") from None
    return train


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError)


def _free_memory() -> None:
    """Give the finished job's model and activations back (the next job, or generation, needs them)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _CaptureLogs(logging.Handler):
    """Copies lora_core's log records made on the job's thread into the job's log tail."""

    def __init__(self, manager: JobManager, thread_id: int) -> None:
        super().__init__(logging.INFO)
        self.manager, self.thread_id = manager, thread_id

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.manager._add_log(f"{record.levelname.lower()}: {record.getMessage()}")


class JobManager:
    """Runs at most one training job of a workspace in a background thread."""

    def __init__(self, workspace: Workspace, train_fn: TrainFn | None = None) -> None:
        self.workspace = workspace
        self._train_fn = train_fn
        self._cond = threading.Condition()
        self._state: JobState | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._saved_at = 0.0
        self._load_latest()

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> JobState | None:
        """A copy of the current (or last) job's state; None if this workspace never trained."""
        with self._cond:
            return copy.deepcopy(self._state)

    def wait(self, version: int, timeout: float) -> JobState | None:
        """The state once its version differs from `version`, or after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._state is not None and self._state.version != version, timeout)
            return copy.deepcopy(self._state)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker thread; True if no job is running afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    # ------------------------------------------------------------------ control

    def check_idle(self) -> None:
        """AppError saying which job runs, if one does."""
        with self._cond:
            if self._state is not None and self._state.active:
                s = self._state
                raise AppError(f"A training job is already running ({s.run_id}, step {s.step} of "
                               f"{s.total_steps or '?'}). Stop it first, or wait for it to finish.")

    def start(self, cfg: TrainConfig, run_dir: Path, *, resume: bool = False) -> JobState:
        """Start training `cfg` into run_dir in the background; AppError if a job is already running."""
        with self._cond:
            self.check_idle()
            self._stop = threading.Event()
            old = self._state if resume and self._state and self._state.run_dir == str(run_dir) else None
            state = JobState(run_id=run_dir.name, run_dir=str(run_dir), base=cfg.model.base,
                             total_steps=cfg.schedule.steps if not cfg.schedule.epochs else 0)
            state.version = self._state.version + 1 if self._state else 0  # watchers of the last job see a change
            if old is not None:  # keep the curve, previews and log of the part already trained
                state.losses, state.samples, state.checkpoints = old.losses, old.samples, old.checkpoints
                state.log, state.step = old.log, old.step
            state.log = [*state.log, "resuming..." if resume else "loading the base model..."][-LOG_LINES:]
            self._state = state
            self._save(force=True)
            self._cond.notify_all()
            stop = self._stop
            self._thread = threading.Thread(target=self._run, args=(cfg, run_dir, resume, stop),
                                            name=f"train-{run_dir.name}", daemon=True)
            self._thread.start()
            log.info("training job %s started (resume=%s)", run_dir.name, resume)
            return copy.deepcopy(state)

    def stop(self) -> JobState:
        """Ask the running job to stop after its current step."""
        with self._cond:
            if self._state is None or not self._state.active:
                raise AppError("No training job is running.")
            self._stop.set()
            if self._state.status != "stopping":
                self._state.status = "stopping"
                self._state.message = "Stopping after the current step..."
                self._bump(force=True)
            return copy.deepcopy(self._state)

    # ------------------------------------------------------------------ worker

    def _run(self, cfg: TrainConfig, run_dir: Path, resume: bool, stop: threading.Event) -> None:
        capture = _CaptureLogs(self, threading.get_ident())
        logging.getLogger("lora_core").addHandler(capture)
        try:
            train = self._train_fn or _default_train()
            for event in train(cfg, stop, run_dir=run_dir, resume=resume):
                self._apply(event)
        except LoraStudioError as e:
            self._end("failed", str(e))
        except Exception as e:  # the UI must learn about any crash, not hang in "running"
            if _is_out_of_memory(e):  # outside the trainer's step loop: model load, cache, previews
                from lora_core.checkpoints import OOM_ADVICE

                self._end("failed", OOM_ADVICE)
            else:
                log.exception("training job %s crashed", run_dir.name)
                self._end("failed", f"Unexpected error: {type(e).__name__}: {e}. The server log has the details.")
        finally:
            logging.getLogger("lora_core").removeHandler(capture)
            _free_memory()
            with self._cond:
                if self._state is not None and self._state.active:
                    self._end("stopped" if stop.is_set() else "failed", "" if stop.is_set()
                              else "The trainer ended without reporting the end of the run.")

    def _apply(self, event: Event) -> None:
        with self._cond:
            s = self._state
            assert s is not None
            line = describe(event, s.total_steps)
            s.log = [*s.log[-LOG_LINES + 1:], line]
            force = True
            if isinstance(event, Started):
                s.total_steps, s.start_step, s.step, s.device = (event.total_steps, event.start_step,
                                                                 event.start_step, event.device)
                s.status = "stopping" if s.status == "stopping" else "running"
            elif isinstance(event, Step):
                s.step, s.loss, s.lr, s.samples_per_s, s.eta_s = (event.step, event.loss, event.lr,
                                                                  event.samples_per_s, event.eta_s)
                s.losses.append((event.step, event.loss))
                force = False
            elif isinstance(event, Sample):
                s.samples.append(dataclasses.asdict(event))
            elif isinstance(event, Saved):
                if event.final:
                    s.adapter = event.path
                else:
                    s.checkpoints.append(event.path)
            elif isinstance(event, Finished):
                s.step, s.adapter = event.step, event.adapter or s.adapter
                s.status, s.ended_at = ("stopped" if event.stopped else "finished"), time.time()
                s.message = "Stopped. Press Resume to continue." if event.stopped else "Finished."
            elif isinstance(event, Failed):
                s.status, s.message, s.ended_at = "failed", event.message, time.time()
            log.info("job %s: %s", s.run_id, line)
            self._bump(force=force)

    def _end(self, status: str, message: str) -> None:
        with self._cond:
            s = self._state
            if s is None or not s.active:
                return
            s.status, s.ended_at = status, time.time()
            s.message = message or ("Stopped. Press Resume to continue." if status == "stopped" else "")
            if message:
                s.log = [*s.log[-LOG_LINES + 1:], f"{status}: {message}"]
            self._bump(force=True)

    def _add_log(self, line: str) -> None:
        with self._cond:
            if self._state is not None:
                self._state.log = [*self._state.log[-LOG_LINES + 1:], line]
                self._bump(force=False)

    # ------------------------------------------------------------------ persistence

    def _bump(self, *, force: bool) -> None:
        """Mark a change (caller holds the lock): wake waiters, save job.json."""
        assert self._state is not None
        self._state.version += 1
        self._cond.notify_all()
        self._save(force=force)

    def _save(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_EVERY_S:
            return
        self._saved_at = now
        assert self._state is not None
        path = Path(self._state.run_dir) / "job.json"
        try:
            tmp = path.with_name(".job.json.tmp")
            tmp.write_text(self._state.to_json(), encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            log.warning("could not save %s: %s", path, e)

    def _load_latest(self) -> None:
        """Pick up the newest run's job.json; a job that was running when the app stopped is interrupted."""
        for run in self.workspace.runs():
            path = run / "job.json"
            if not path.is_file():
                continue
            try:
                state = JobState.from_json(path.read_text(encoding="utf-8"))
            except (ValueError, TypeError, OSError) as e:
                log.warning("ignoring unreadable %s: %s", path, e)
                continue
            state.run_dir, state.run_id = str(run), run.name  # the workspace may have moved
            if state.active:
                state.status = "interrupted"
                state.message = "The app stopped while this run was training. Press Resume to continue."
            self._state = state
            self._save(force=True)
            return
