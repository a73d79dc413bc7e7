"""Which checkpoint a training run starts from, and what a resume may not change.

A fresh run needs a folder without checkpoints or metrics (two runs' rows in
one metrics.jsonl cannot be told apart). ``resume`` means "continue if there
is something to continue, else start" (verl's ``resume_mode: auto``): a folder
killed before its first checkpoint has its partial files cleared and the run
starts from step 0, so a scheduler that always restarts with ``--resume``
never meets a dead end. A resumed run must be the same run:
its config is compared with the saved ``config.yaml``, and only the fields
declared ``resumable(...)`` in their section may differ
(``Command.resume_changes``, the rule eval and ood follow too). The last checkpoint must pass its SHA-256
check; with ``resume_from_previous`` a damaged one is set aside and the one
before it is used.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from softtokens.checkpoint import CorruptCheckpoint, checkpoints, verify_checkpoint
from softtokens.config import TrainConfig
from softtokens.outdir import refuse_to_overwrite
from softtokens.errors import UsageError


QUIET = ("output_dir", "resume", "resume_from_previous", "allow_unverified")  # not listed in the refusal: they say how to resume


# What a run writes before its first checkpoint-<step>: cleared when --resume finds nothing to resume.
PARTIAL = ("metrics.jsonl", "completions.jsonl", "tensorboard", "checkpoint-best", "ood-before", "summary.json",
           "training.png")


def partial_files(out: Path) -> list[Path]:
    """A run's files in ``out`` that no checkpoint backs (and the .tmp / .old folders of a cut-short write)."""
    return [p for p in [*(out / name for name in PARTIAL), *out.glob("checkpoint-*.tmp"), *out.glob("checkpoint-*.old")]
            if p.exists()]


def clear_partial(out: Path) -> list[str]:
    """Remove what ``partial_files`` finds; returns the names removed."""
    removed = []
    for path in partial_files(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path.name)
    return removed


def start_point(cfg: TrainConfig, out: Path, main: bool = True) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), or a one-line error saying why the folder cannot be
    used. With resume and no checkpoint yet, the partial files are cleared (by the main rank) and None returned."""
    import yaml

    found = checkpoints(out)
    if not cfg.output.resume:
        if found:
            refuse_to_overwrite(out, "checkpoints", "output_dir")
        if (out / "metrics.jsonl").exists():
            raise UsageError(f"{out} holds metrics.jsonl of a run stopped before its first checkpoint: pass --resume "
                             "to start it again from step 0, or choose another output_dir")
        return None
    if not found:
        removed = clear_partial(out) if main else []
        if main:
            print(f"--resume: no checkpoint in {out} yet; starting from step 0"
                  + (f" (cleared {', '.join(removed)})" if removed else ""))
        return None
    saved = out / "config.yaml"
    if saved.is_file():
        changed = cfg.resume_changes(yaml.safe_load(saved.read_text()) or {})
        if changed:
            raise UsageError(f"cannot resume {out} with another configuration ({'; '.join(changed)}); only "
                             f"{', '.join(f for f in cfg.resumable_options() if f not in QUIET)} may change on resume")
    for i in range(len(found) - 1, -1, -1):
        try:
            verify_checkpoint(found[i], cfg.checkpoint.allow_unverified)
            return found[i]
        except CorruptCheckpoint as e:
            if not cfg.checkpoint.resume_from_previous:
                raise UsageError(f"{e}; pass --resume-from-previous to resume from the checkpoint before it") from None
            if i == 0:
                raise UsageError(f"{e}, and no earlier checkpoint is left to resume from") from None
            warnings.warn(f"{e}: resuming from {found[i - 1].name}")
    raise AssertionError("unreachable")


def set_aside_later(out: Path, start: Path) -> None:
    """Rename checkpoints after ``start`` (damaged ones skipped by resume_from_previous) to *.corrupt."""
    step = int(start.name.split("-")[1])
    for path in checkpoints(out):
        if int(path.name.split("-")[1]) > step:
            path.rename(path.with_name(path.name + ".corrupt"))
