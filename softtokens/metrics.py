"""Training metrics: one JSON line per logged step, and TensorBoard events when tensorboard is installed.

A run resumed from the checkpoint of step k first cuts both back to step k:
rows logged after that checkpoint by the interrupted run are redone, so every
step has exactly one row (TensorBoard's ``purge_step`` hides the old events).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from softtokens import jsonl


class MetricsLogger:
    def __init__(self, output_dir: Path, step: int = 0):
        """``step``: the step the run starts from (its checkpoint's); later rows already on disk are dropped."""
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.path.exists():
            rows = jsonl.read(self.path)
            keep = [r for r in rows if r.get("step", 0) <= step]
            if len(keep) != len(rows) or self.path.read_bytes()[-1:] not in (b"", b"\n"):
                jsonl.rewrite(self.path, keep)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=step + 1 if step else None)
        except ImportError:
            warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")

    def log(self, step: int, metrics: dict) -> None:
        jsonl.append(self.path, [{"step": step, **metrics}])
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {output_dir}; is it a training output_dir?")
    return jsonl.read(path)
