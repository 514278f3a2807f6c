"""Run checkpoints: the model checkpoint plus the state that makes a resumed run exact.

A run checkpoint is a folder (`out_dir/last`, `out_dir/best`) holding the model checkpoint
(model.safetensors + config.json, satic.model.checkpoint) and `train_state.pt`: optimizer,
schedule, RNG states, data-loader position, iteration, epoch and best score. It is written
into a staging folder and then swapped in by renames, so a crash at any moment leaves the
previous checkpoint whole (as `last` or, between the two renames, `last.old`).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from satic.errors import SaticError, library_reason
from satic.io import atomic_path, cannot_write, sync_folder, torch_load, torch_save, write_failure
from satic.model.transformer import all_finite
from satic.training.schedule import ScheduleState

STATE_FILE = "train_state.pt"


@dataclass
class Progress:
    """Where the run is; saved with every checkpoint."""

    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # completed passes over the training split
    best_score: float | None = None  # best validation score so far
    best_metric: str | None = None  # the metric best_score is of ("CIDEr" raw, "CIDEr-D" label references)
    history: list = field(default_factory=list)  # validation records [{iteration, epoch, metrics}]
    # stopped by a signal held during the step that ended at a save_every multiple, before that validation began:
    # the resumed run validates there first, as the uninterrupted run did (the reference redoes the step)
    validation_due: bool = False

    @property
    def validated_here(self) -> bool:
        """Whether the last validation recorded is the one at the current iteration."""
        return bool(self.history) and self.history[-1]["iteration"] == self.iteration


def _whole(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:  # the run log's steps: int64
        raise ValueError(f"{name} is {value!r}, not a whole number from 0 to 2**63 - 1")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lacks(saved: dict, names: tuple[str, ...], what: str) -> None:
    missing = [name for name in names if name not in saved]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")


def read_progress(saved: dict) -> Progress:
    """A checkpoint's progress; one saved before best_metric was recorded scored by CIDEr-D. A value of the wrong
    type or out of range is a ValueError (a NaN best score would keep every later validation from being best)."""
    progress = Progress(**saved)
    _lacks(saved, ("iteration",), "progress")
    _whole(progress.iteration, "progress iteration")
    _whole(progress.epoch, "progress epoch")
    if progress.best_score is not None and not _finite(progress.best_score):
        raise ValueError(f"progress best_score is {progress.best_score!r}, not a finite number")
    if progress.best_metric is not None and not isinstance(progress.best_metric, str):
        raise ValueError(f"progress best_metric is {progress.best_metric!r}, not a metric's name")
    if not isinstance(progress.history, list) or not all(isinstance(r, dict) for r in progress.history):
        raise ValueError("progress history is not a list of validation records")
    if not isinstance(progress.validation_due, bool):
        raise ValueError(f"progress validation_due is {progress.validation_due!r}, not true or false")
    if progress.best_score is not None and progress.best_metric is None:
        progress.best_metric = "CIDEr-D"
    return progress


def read_schedule(saved: dict) -> ScheduleState:
    """A checkpoint's learning-rate schedule position; a value of the wrong type or out of range is a ValueError
    (the rate is computed from it at every step)."""
    schedule = ScheduleState(**saved)
    _lacks(saved, tuple(f.name for f in fields(ScheduleState)), "schedule")
    for name in ("step", "epoch", "plateau_bad"):
        _whole(getattr(schedule, name), f"schedule {name}")
    if not _finite(schedule.plateau_scale) or not 0 < schedule.plateau_scale <= 1:
        raise ValueError(f"schedule plateau_scale is {schedule.plateau_scale!r}, not a number in (0, 1]")
    if schedule.plateau_best is not None and not _finite(schedule.plateau_best):
        raise ValueError(f"schedule plateau_best is {schedule.plateau_best!r}, not a finite number")
    return schedule


def check_adam_state(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                     flags: dict[str, bool]) -> None:
    """Adam's settings and moments as load_state_dict left them (it checks neither): a moment of another shape
    than its weight would be read and written past its end by the fused step, a setting of the wrong type fail at
    the first step, and NaN moments or settings out of range silently spoil the weights. `flags` are the fresh
    optimizer's true/false settings, which a run never changes (maximize, amsgrad, ...)."""
    for group in optimizer.param_groups:
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(_finite(beta) and 0 <= beta < 1 for beta in betas)):
            raise ValueError(f"Adam's betas are {betas!r}, not two numbers in [0, 1)")
        for key in ("eps", "weight_decay"):
            if not _finite(group.get(key)) or group[key] < 0:
                raise ValueError(f"Adam's {key} is {group.get(key)!r}, not a number >= 0")
        for key, value in flags.items():
            if group.get(key, value) is not value:
                raise ValueError(f"Adam's {key} is {group.get(key)!r}, where this run has {value}")
        for key in ("foreach", "fused"):
            if group.get(key) not in (None, True, False):
                raise ValueError(f"Adam's {key} is {group.get(key)!r}, not true, false or none")
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:  # a weight that has had no gradient yet
                continue
            name = names.get(param, "a weight")
            _lacks(state, ("step", *moments), f"Adam's state of {name}")
            step = state["step"]
            step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
            if not _finite(step) or step < 0:
                raise ValueError(f"Adam's step of {name} is {step!r}, not a number >= 0")
            for key in moments:
                moment = state[key]
                if not isinstance(moment, torch.Tensor) or moment.shape != param.shape or moment.dtype != param.dtype:
                    held = (f"{moment.dtype} of shape {tuple(moment.shape)}" if isinstance(moment, torch.Tensor)
                            else type(moment).__name__)
                    raise ValueError(f"Adam's {key} of {name} is {held}, its weight {param.dtype} of shape "
                                     f"{tuple(param.shape)}")
                if not all_finite(moment):
                    raise ValueError(f"Adam's {key} of {name} has NaN or Inf values")
                if key != "exp_avg" and (moment < 0).any():
                    raise ValueError(f"Adam's {key} of {name} has negative values")


def rng_state() -> dict:
    """Global RNG states (python, numpy, torch CPU and CUDA) as plain types and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_run_checkpoint(target: Path, write_contents: Callable[[Path], None]) -> None:
    """Fill a staging folder with `write_contents`, then swap it in for `target` by renames. A failed write (a full
    disk) removes the staging folder and names `target`; the previous checkpoint stays."""
    staging = target.with_name(target.name + ".partial")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write_contents(staging)
        sync_folder(staging)  # on the disk before the renames make it the checkpoint and delete the previous one
    except BaseException as err:
        # why, read before the staging folder goes (a vague error is told by the size of the files written there)
        reason = write_failure(err, staging) if isinstance(err, OSError) else None
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):  # copying a file names the one copied, not the one the disk refused
            raise cannot_write(target, reason or err) from err
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    sync_folder(target.parent, files=False)  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def copy_files(source: Path, target: Path) -> None:
    """Copy the files of one checkpoint folder into another (best = a copy of last)."""
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)


def find_checkpoint(path: Path) -> Path | None:
    """The whole checkpoint at `path`, or the previous one a crash left as `path.old`."""
    named = path if path.name else path.absolute()  # "." (the checkpoint folder itself) has no name of its own
    for candidate in (path, named.with_name(named.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def save_state(directory: Path, state: dict[str, Any]) -> None:
    with atomic_path(directory / STATE_FILE) as tmp:
        torch_save(state, tmp)


# The entries of train_state.pt (the trainer's _save writes every one).
STATE_ENTRIES = ("config", "optimizer", "schedule", "progress", "loader", "rng", "sampler")


def damaged_state(path: Path, problem: str) -> SaticError:
    return SaticError(f"resume state {path} {problem}: the run's state is damaged; resume from another of its "
                      "checkpoints (such as OUT_DIR/best or OUT_DIR/last), or start the run over")


# errors of the machine a state is read on (no memory, fewer GPUs), by the names this torch has
MACHINE_ERRORS = tuple(error for error in (getattr(torch, "OutOfMemoryError", None),
                                          getattr(torch.cuda, "OutOfMemoryError", None),
                                          getattr(torch, "AcceleratorError", None)) if error is not None)


@contextlib.contextmanager
def reading_state(directory: Path) -> Iterator[None]:
    """Entries of a damaged train_state.pt (a wrong type, a truncated list) fail as one SaticError naming it."""
    try:
        yield
    except MACHINE_ERRORS:  # the machine's, not the file's: as they are
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as err:
        if "CUDA" in str(err) or "device" in str(err).lower():  # e.g. fewer GPUs than the run had
            raise
        raise damaged_state(directory / STATE_FILE, f"has a malformed entry ({type(err).__name__}: {err})") from err


def load_state(directory: Path) -> dict[str, Any]:
    """Read train_state.pt with weights_only=True (tensors and plain types only), checking that it holds
    every entry a resumed run reads."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise SaticError(f"resume state not found: {path} (resume needs a folder written by `satic train`, "
                         "such as OUT_DIR/last)")
    try:
        state = torch_load(path)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise SaticError(f"cannot read resume state {path} ({library_reason(err)}); the file is damaged: resume "
                         "from another checkpoint") from None
    if not isinstance(state, dict):
        raise damaged_state(path, f"holds a {type(state).__name__}, not the mapping `satic train` writes")
    missing = [name for name in STATE_ENTRIES if name not in state]
    if missing:
        raise damaged_state(path, f"lacks {', '.join(missing)}")
    return state
