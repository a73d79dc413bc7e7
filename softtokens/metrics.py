"""Training metrics: one JSON line per logged step, plus TensorBoard events or a Weights & Biases run (report_to).

A run resumed from the checkpoint of step k first cuts both back to step k:
rows logged after that checkpoint by the interrupted run are redone, so every
step has exactly one row (TensorBoard's ``purge_step`` hides the old events).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from softtokens import jsonl
from softtokens.errors import UsageError


COMPLETIONS = "completions.jsonl"  # log_completions' rollouts, a line each


class MetricsLogger:
    def __init__(self, output_dir: Path, step: int = 0, report_to: str = "tensorboard", config: dict | None = None,
                 run_name: str = ""):
        """``step``: the step the run starts from (its checkpoint's); later rows already on disk are dropped."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.completions = Path(output_dir) / COMPLETIONS
        for path in (self.path, self.completions):
            rows = jsonl.read(path, repair=True)
            keep = [r for r in rows if r.get("step", 0) <= step]
            if len(keep) != len(rows):
                jsonl.rewrite(path, keep)
        self.writer = self.wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=step + 1 if step else None)
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
        elif report_to == "wandb":
            import wandb

            # one W&B run per output folder, resumed with it. W&B drops steps it has seen, so after a resume it
            # keeps the interrupted run's values for the redone steps (metrics.jsonl and TensorBoard hold the new ones)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "softtokens"),
                                    name=run_name or default_run_name(output_dir), config=config,
                                    id=wandb_id(output_dir), resume="allow", dir=str(output_dir))

    def log(self, step: int, metrics: dict) -> None:
        jsonl.append(self.path, [{"step": step, **metrics}])
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        """Rollouts to read (prompt, CoT, answer, rewards, advantage): completions.jsonl, a TensorBoard text
        panel, a W&B table."""
        if not rows:
            return
        jsonl.append(self.completions, [{"step": step, **r} for r in rows])
        keys = list(rows[0])
        if self.writer is not None:
            table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            table += ["| " + " | ".join(str(r[k]).replace("|", "\\|").replace("\n", " ") for k in keys) + " |"
                      for r in rows]
            self.writer.add_text("completions", "\n".join(table), step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"completions": wandb.Table(columns=keys, data=[[str(r[k]) for k in keys] for r in rows])},
                           step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def default_run_name(output_dir: Path) -> str:
    """The folder's name, with its parent's for a seed-N folder (grid runs: 'hard/seed-0', not 'seed-0')."""
    path = Path(output_dir).resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("seed-") else path.name


def wandb_id(output_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def check_report_to(report_to: str) -> None:
    """Fail before the model loads when the chosen logger is not installed."""
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("report_to wandb needs the wandb package: pip install wandb (or report_to tensorboard)") from None


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {output_dir}; is it a training output_dir?")
    return jsonl.read(path)
