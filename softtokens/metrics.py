"""Training metrics: one JSON line per logged step, and TensorBoard events when tensorboard is installed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except ImportError:
            warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")

    def log(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {output_dir}; is it a training output_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
