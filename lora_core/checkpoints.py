"""The run directory: its layout, the event log, checkpoints, the final adapter and the resume state.

Every file is written atomically (temp file beside it, then rename), so a crash or a full disk never
leaves a half-written file under a final name, and the previous checkpoint stays usable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import TrainConfig, load_toml, save_toml, to_metadata
from .errors import ConfigError, TrainingError
from .events import Event
from .export import WriteError, atomic_write_bytes, build_metadata, save_adapter
from .lora import LoRAModule
from .models import LoadedModel

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
OOM_ADVICE = ("The GPU ran out of memory. Try, in this order: a smaller batch (schedule.batch_size), "
              "gradient checkpointing (performance.gradient_checkpointing = true), a lower resolution "
              "(data.resolution), or a lower rank. The memory was freed; you can start again.")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def prepare_run_dir(run: Path, cfg: TrainConfig, resume: bool) -> None:
    """Create RUN/ with its folders and config.toml; refuse to overwrite another run's files."""
    if resume:
        if not (run / "state" / STATE_FILE).is_file():
            raise TrainingError(f"Cannot resume '{run}': it has no saved state (state/{STATE_FILE}). Resume "
                                "needs a run that saved a checkpoint or was stopped; start a new run instead.")
        _check_resume_settings(run, cfg)
    elif (run / "log.jsonl").exists() or (run / "adapter.safetensors").exists():
        raise TrainingError(f"'{run}' already holds a training run. Choose another output folder, or resume "
                            "that run with --resume.")
    try:
        for sub in ("samples", "checkpoints", "state"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        save_toml(cfg, run / "config.toml")
    except OSError as e:
        raise TrainingError(f"Cannot create the run folder '{run}': {e.strerror or e}. Choose another output "
                            "folder (--out) or free some disk space.") from None


RESUME_FIXED = ("model.base", "lora.*", "optim.optimizer")  # the saved state only fits these as they were


def _check_resume_settings(run: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything is written, a resume whose settings the saved state cannot fit."""
    if not (run / "config.toml").is_file():
        return
    try:
        old = load_toml(run / "config.toml").to_dict()
    except ConfigError:
        return  # the state check (load_state) still refuses what does not fit
    new = cfg.to_dict()
    changed = []
    for key in RESUME_FIXED:
        section, _, name = key.partition(".")
        names = old[section] if name == "*" else [name]
        changed += [f"{section}.{n} ({old[section][n]!r} -> {new[section][n]!r})" for n in names
                    if old[section][n] != new[section][n]]
    if changed:
        raise TrainingError(f"Cannot resume '{run}' with changed {', '.join(changed)}: the saved state was "
                            "trained with the old values. Change only schedule.steps (and sampling/saving "
                            "settings) when resuming, or start a new run.")


class EventLog:
    """RUN/log.jsonl: one JSON object per event, flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed = False

    def write(self, event: Event) -> None:
        """Append one line. A failed append (full disk) is logged, not raised: the log is a record of the
        run, and the next checkpoint save reports the disk problem with what to do about it."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(event.to_json() + "\n")
        except OSError as e:
            if not self.failed:
                log.warning("could not append to %s (%s); training goes on without it", self.path, e.strerror or e)
            self.failed = True


def read_log(path: str | Path) -> list[dict]:
    """The events of a run's log.jsonl (a torn last line, from a crash, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping an unreadable line in %s", path)
    return out


def average_gradients(acc: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Data parallel: every process ends the step with the mean gradient (one flat all-reduce)."""
    if acc.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def weights_digest(modules: dict[str, LoRAModule]) -> str:
    """SHA-256 over every LoRA weight (fp32 bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        for w in (modules[name].lora_down.weight, modules[name].lora_up.weight):
            h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def adapter_metadata(cfg: TrainConfig, model: LoadedModel, step: int, data) -> dict[str, str]:
    lo = cfg.lora
    args = {"conv_dim": lo.conv_rank, "conv_alpha": lo.conv_alpha} if lo.targets == "conv" else {}
    extra = {
        "ss_steps": step, "ss_learning_rate": cfg.optim.lr, "ss_unet_lr": cfg.optim.lr,
        "ss_text_encoder_lr": cfg.optim.text_encoder_lr if lo.train_text_encoder else 0,
        "ss_lr_scheduler": cfg.schedule.scheduler, "ss_optimizer": cfg.optim.optimizer,
        "ss_seed": cfg.schedule.seed, "ss_num_train_images": len(data.items),
        "ss_mixed_precision": cfg.performance.mixed_precision, "ss_clip_skip": cfg.model.clip_skip,
        "ss_noise_offset": cfg.optim.noise_offset, "ss_min_snr_gamma": cfg.optim.min_snr_gamma,
        "ss_tag_frequency": json.dumps(data.report.tag_frequency()),
        **to_metadata(cfg),
    }
    return build_metadata(model, rank=lo.rank, alpha=lo.alpha, output_name=cfg.saving.output_name,
                          network_args=args, resolution=cfg.data.resolution,
                          trigger_phrase=cfg.data.trigger_word, extra=extra)


def _portable(opt_state: dict) -> dict:
    """An optimizer state that resumes anywhere: a graphed run's device lr and capturable flag undone."""
    for group in opt_state["param_groups"]:
        group["lr"] = float(group["lr"])
        group["capturable"] = False
    return opt_state


def save_state(run: Path, modules: dict[str, LoRAModule], opt: torch.optim.Optimizer, step: int) -> None:
    """What resume needs: the fp32 LoRA weights, the optimizer state and the step."""
    state = {
        "step": step,
        "lora": {f"{n}.{k}": v.detach().cpu() for n, m in modules.items()
                 for k, v in (("down", m.lora_down.weight), ("up", m.lora_up.weight))},
        "optimizer": _portable(opt.state_dict()),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run / "state" / STATE_FILE, buf.getvalue())


def load_state(run: Path, modules: dict[str, LoRAModule], opt: torch.optim.Optimizer) -> int:
    """Restore a saved state (no pickled code runs: weights_only); returns the step to continue from."""
    path = run / "state" / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise TrainingError(f"The saved state '{path}' cannot be read ({e}); resume from an earlier copy of "
                            "the run or start again.") from None
    try:
        with torch.no_grad():
            for n, m in modules.items():
                m.lora_down.weight.copy_(state["lora"][f"{n}.down"])
                m.lora_up.weight.copy_(state["lora"][f"{n}.up"])
        opt.load_state_dict(state["optimizer"])
        return int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainingError(f"The saved state '{path}' does not fit this run's settings ({type(e).__name__}: "
                            f"{e}). Resume with the settings the run was started with (lora.rank, lora.targets, "
                            "optimizer); change only schedule.steps, or start a new run.") from None


def save_checkpoint(run: Path, cfg: TrainConfig, model: LoadedModel, modules: dict[str, LoRAModule],
                    opt: torch.optim.Optimizer, step: int, data) -> str:
    """checkpoints/step-NNNNNN.safetensors plus state/; keeps the newest `saving.keep_last`."""
    path = run / "checkpoints" / f"step-{step:06d}.safetensors"
    with _save_errors(run, f"the checkpoint at step {step}"):
        save_adapter(path, modules, adapter_metadata(cfg, model, step, data), _DTYPES[cfg.saving.precision])
        save_state(run, modules, opt, step)
    keep = cfg.saving.keep_last
    old = sorted((run / "checkpoints").glob("step-*.safetensors"))[:-keep] if keep else []
    for p in old:
        p.unlink(missing_ok=True)
    return str(path)


def save_final(run: Path, cfg: TrainConfig, model: LoadedModel, modules: dict[str, LoRAModule],
               opt: torch.optim.Optimizer, step: int, data) -> str:
    """adapter.safetensors, plus state/ so a stopped run can be resumed."""
    path = run / "adapter.safetensors"
    with _save_errors(run, f"the adapter at step {step}"):
        save_adapter(path, modules, adapter_metadata(cfg, model, step, data), _DTYPES[cfg.saving.precision])
        save_state(run, modules, opt, step)
    return str(path)


@contextlib.contextmanager
def _save_errors(run: Path, what: str) -> Iterator[None]:
    """A failed write (full disk) becomes a TrainingError that says what was kept and how to go on."""
    try:
        yield
    except WriteError as e:
        kept = _saved_step(run)
        then = (f"the state saved at step {kept} is intact: fix the problem, then continue with "
                f"`lora-studio train --resume {run}` (or Resume in the app)." if kept is not None else
                "nothing had been saved yet: fix the problem and start the run again.")
        raise TrainingError(f"Could not save {what}. {e} Training stopped; {then}") from e


def _saved_step(run: Path) -> int | None:
    """The step of RUN/state, or None (read with weights_only: no pickled code runs)."""
    try:
        return int(torch.load(run / "state" / STATE_FILE, map_location="cpu", weights_only=True)["step"])
    except Exception:  # missing or unreadable: there is no state to speak of
        return None
