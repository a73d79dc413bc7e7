"""Checkpoints: the model in Hugging Face format (safetensors) plus optimiser, scheduler, RNG and step state.

A checkpoint directory loads with ``AutoModelForCausalLM.from_pretrained`` for
ordinary hard inference. It is written to a temporary folder and renamed, so
an interruption never leaves a half-written checkpoint under its final name.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

STATE = "trainer_state.pt"


def _write_dir(path: Path, write) -> Path:
    """Run ``write(folder)`` into a temporary folder, then rename it to ``path``: never half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _save_hf(folder: Path, lm) -> None:
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)


def save_checkpoint(path: Path, lm, optimizer, scheduler, state: dict) -> Path:
    """The model as a Hugging Face folder plus trainer_state.pt (optimiser, scheduler, RNG, step state)."""

    def write(folder: Path) -> None:
        _save_hf(folder, lm)
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, folder / STATE)

    return _write_dir(path, write)


def save_model(path: Path, lm) -> Path:
    """The model and tokenizer only (the best checkpoint, the final export)."""
    return _write_dir(path, lambda folder: _save_hf(folder, lm))


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, lm, optimizer, scheduler) -> dict:
    """Restore a checkpoint into a loaded model; a broken or mismatched one is a clear error, never a fresh start."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    if not (path / STATE).is_file() or not weights:
        raise ValueError(f"checkpoint {path} is incomplete: it needs {STATE} and *.safetensors; delete it to resume "
                         "from an earlier one")
    try:
        saved = {}
        for w in weights:
            saved.update(load_file(str(w)))
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  any unreadable file means a corrupt checkpoint
        raise ValueError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); delete it to resume from an "
                         "earlier one") from None
    model_keys = set(lm.model.state_dict())
    missing = model_keys - set(saved)
    if lm.model.config.tie_word_embeddings:  # a tied head is saved once
        missing.discard("lm_head.weight")
    unexpected = set(saved) - model_keys
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, p in lm.model.state_dict().items():
        if name in saved and saved[name].shape != p.shape:
            raise ValueError(f"checkpoint {path} does not match the model: {name} is {tuple(saved[name].shape)}, "
                             f"the model's is {tuple(p.shape)}")
    lm.model.load_state_dict(saved, strict=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state
