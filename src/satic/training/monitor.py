"""What a person watches during a run: JSON-lines log, TensorBoard scalars, and a PNG of curves."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from satic.io import atomic_path, cannot_write, deferred_interrupts

LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"


class RunLog:
    """Append-only JSON lines (`{"kind": "train"|"val", "iteration": ..., ...}`) mirrored to TensorBoard."""

    def __init__(self, out_dir: Path, resume_iteration: int | None = None, tensorboard: bool = True,
                 validated: bool = True):
        self.path = out_dir / LOG_FILE
        if resume_iteration is not None:
            truncate_log(self.path, resume_iteration, validated)
        elif self.path.exists():
            self.path.unlink()
        self.writer, self.failed = None, False
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events from resume_iteration + 1 on are the resumed run's: those up to the checkpoint stay shown
            purge = None if resume_iteration is None else resume_iteration + 1
            self.events = out_dir / "tensorboard"
            try:
                self.writer = SummaryWriter(str(self.events), purge_step=purge)
            except OSError as err:
                raise cannot_write(self.events, err) from err
            self._excepthook = threading.excepthook
            threading.excepthook = self._quiet_writer_thread

    def _quiet_writer_thread(self, args: threading.ExceptHookArgs) -> None:
        """A write refused in TensorBoard's writer thread (a full disk) ends that thread and is raised again by the
        writer's next call here, which names it: not printed as a traceback as well."""
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            self._excepthook(args)

    def write(self, kind: str, iteration: int, values: dict[str, float]) -> None:
        record = {"kind": kind, "iteration": iteration, **values}
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:  # a torn last line is left out when the log is read back
            self.failed = True
            raise cannot_write(self.path, err) from err
        if self.writer is not None:
            try:
                with deferred_interrupts():
                    for name, value in values.items():
                        if isinstance(value, (int, float)):
                            self.writer.add_scalar(f"{kind}/{name}", value, iteration)
            except OSError as err:
                self.failed = True
                raise cannot_write(self.events, err) from err

    def close(self) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except OSError as err:
            if not self.failed:  # else the same refusal, already raised by write
                raise cannot_write(self.events, err) from err
        finally:
            if threading.excepthook == self._quiet_writer_thread:
                threading.excepthook = self._excepthook


def read_log(path: Path) -> list[dict]:
    """The records of a log. A run killed while appending leaves a torn last line: it is left out (a
    resumed run redoes that iteration)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [json.loads(line) for line in lines]


def truncate_log(path: Path, iteration: int, validated: bool = True) -> None:
    """Drop records after `iteration`: a resumed run redoes them and writes them again. Unless `validated` (the
    resumed checkpoint holds the validation at `iteration`), that validation's record goes too: a stop cut it short
    after it was logged, and the resumed run skips it or does it again."""
    kept = [r for r in read_log(path) if r["iteration"] < iteration or r["iteration"] == iteration
            and (validated or r["kind"] != "val")]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(log_path: Path, out_path: Path, title: str) -> None:
    """Training loss / reward, validation loss, CIDEr (raw references) and CIDEr-D (label file) against
    iterations, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    panels = [("train", "loss"), ("train", "reward"), ("train", "lr"), ("val", "loss"), ("val", "CIDEr"),
              ("val", "CIDEr-D")]
    panels = [(k, n) for k, n in panels if any(r["kind"] == k and n in r for r in records)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (kind, name) in zip(axes[0], panels):
        points = [(r["iteration"], r[name]) for r in records if r["kind"] == kind and name in r]
        ax.plot(*zip(*points), marker="o" if kind == "val" else None, markersize=3)
        ax.set_title(f"{kind} {name}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
