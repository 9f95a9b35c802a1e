"""The one-directory-per-run layout every stage writes.

```
<output_dir>/
  config.yaml       fully resolved config (written by passreid.config.save_config)
  log.txt           rank-0 log (setup_logging)
  metrics.jsonl     one JSON object per line (MetricsWriter)
  schedules.npz     the per-iteration lr (and wd / momentum where scheduled) of the run (save_schedules)
  tb/               TensorBoard event files (MetricsWriter)
  checkpoint.pth    latest full training state, written atomically (Checkpointer)
  checkpoint.prev.pth  the checkpoint before it, read when checkpoint.pth cannot be (Checkpointer)
  model_final.pth   the hand-over to the next stage
```
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SCHEDULES_FILE = "schedules.npz"
TENSORBOARD_DIR = "tb"
CHECKPOINT_FILE = "checkpoint.pth"
FINAL_MODEL_FILE = "model_final.pth"


@dataclass(frozen=True)
class OutputLayout:
    """Paths of the standard files inside one run's output directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def schedules(self) -> Path:
        return self.root / SCHEDULES_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_FILE

    @property
    def final_model(self) -> Path:
        return self.root / FINAL_MODEL_FILE


def output_layout(output_dir: str | os.PathLike[str]) -> OutputLayout:
    """Return the standard paths under ``output_dir`` (nothing is created)."""
    return OutputLayout(Path(output_dir))


def make_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create the run's output directory (parents too; safe if it exists) and return it.

    Raises ``NotADirectoryError`` if ``path`` exists and is a file, an ``OSError`` naming ``path`` if it cannot
    be created, ``PermissionError`` if the directory cannot be written, so a run fails before training instead
    of at its first checkpoint.
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"output directory {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # read-only or missing mount, no permission on a parent, a parent that is a file
        raise type(error)(error.errno, f"cannot create the output directory {root}: {error.strerror}") from error
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {root} is not writable")
    return root
