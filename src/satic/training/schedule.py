"""Learning-rate schedules of the reference: Noam, step decay per epoch, reduce-on-plateau.

The learning rate is always a pure function of the config and a small state (optimizer steps,
epoch, plateau reductions). On resume the state comes from the checkpoint and the constants
from the config given now, so the config wins for its constants and the checkpoint for the
position in the schedule (a resumed run with the same config continues exactly).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from satic.training.config import OptimConfig


PLATEAU_EPS = 1e-8  # torch's ReduceLROnPlateau skips a cut of the rate smaller than this


@dataclass
class ScheduleState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    plateau_scale: float = 1.0  # product of reduce-on-plateau factors so far
    plateau_best: float | None = None  # best validation score seen by reduce-on-plateau
    plateau_bad: int = 0  # validations since the best one

    def state_dict(self) -> dict:
        return asdict(self)


def noam_rate(step: int, d_model: int, factor: float, warmup: int) -> float:
    """factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5); step >= 1."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def learning_rate(config: OptimConfig, state: ScheduleState, d_model: int) -> float:
    """The rate for the next optimizer step (the reference increments the step before computing it)."""
    if config.schedule == "noam":
        return noam_rate(state.step + 1, d_model, config.noam_factor, config.noam_warmup)
    if config.schedule == "step":
        if config.decay_start >= 0 and state.epoch > config.decay_start:
            return config.lr * config.decay_rate ** ((state.epoch - config.decay_start) // config.decay_every)
        return config.lr
    if config.schedule == "plateau":
        return config.lr * state.plateau_scale
    return config.lr


def observe_validation(config: OptimConfig, state: ScheduleState, score: float) -> None:
    """Reduce-on-plateau bookkeeping after a validation, as the reference: torch's ReduceLROnPlateau (mode
    'min', relative threshold 1e-4) stepped with -score. A score counts as no worse when it is above
    best * (1 - 1e-4), so a slight drop of CIDEr still resets the patience and lowers the best."""
    if config.schedule != "plateau":
        return
    best = math.inf if state.plateau_best is None else -state.plateau_best  # torch starts from +inf: a first
    if -score < best * (1 - 1e-4):  # score of NaN (or -inf) is a stall there, not the best
        state.plateau_best, state.plateau_bad = score, 0
        return
    state.plateau_bad += 1
    if state.plateau_bad > config.plateau_patience:
        rate = config.lr * state.plateau_scale
        if rate - rate * config.plateau_factor > PLATEAU_EPS:
            state.plateau_scale *= config.plateau_factor
        state.plateau_bad = 0
