"""Checkpoints: the model in Hugging Face format (safetensors) plus optimiser, scheduler, RNG and step state.

A checkpoint directory loads with ``AutoModelForCausalLM.from_pretrained`` for
ordinary hard inference. It is written to a temporary folder and renamed, so
an interruption never leaves a half-written checkpoint under its final name.
``checksums.json`` holds each file's SHA-256, checked before a resume, so a
flipped byte on disk is an error naming the file, never a silent load.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softtokens.errors import UsageError

if TYPE_CHECKING:
    from softtokens.config import TrainConfig

STATE = "trainer_state.pt"
CHECKSUMS = "checksums.json"


class CorruptCheckpoint(UsageError):
    """A checkpoint whose files are not the ones that were written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    sums = {str(p.relative_to(folder)): _sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def verify_checkpoint(path: Path, allow_unverified: bool = False) -> None:
    """Every file listed in checksums.json is there with its SHA-256. A checkpoint without the list cannot be
    checked: refused, unless ``allow_unverified`` (a checkpoint written before the list existed)."""
    path = Path(path)
    listed = path / CHECKSUMS
    if not listed.is_file():
        if allow_unverified:
            return
        raise CorruptCheckpoint(f"checkpoint {path} has no {CHECKSUMS}, so its files cannot be checked; pass "
                                "--allow-unverified to resume from it anyway")
    try:
        sums = json.loads(listed.read_text())
    except ValueError:
        raise CorruptCheckpoint(f"checkpoint {path}: {CHECKSUMS} is corrupt") from None
    for name, digest in sums.items():
        if not (path / name).is_file():
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its SHA-256 (the file was damaged "
                                    "after it was written)")


def generate_command(cfg: TrainConfig, model: str = "<this folder>", question: str = "...") -> str:
    """The ``softtokens generate`` command that runs a trained model's CoT with the settings it was trained with
    (mode, tau, gamma, noise placement, prompt, chat template, CoT length)."""
    import shlex

    from softtokens import prompts

    cot, ro = cfg.cot, cfg.rollout
    words = ["softtokens", "generate", "--model", model, "--mode", cot.mode, "--temperature", repr(cot.temperature),
             "--gamma", repr(cot.gamma), "--noise-on", cot.noise_on]
    if cot.noise_on == "topk_logits":
        words += ["--noise-top-k", str(cot.noise_top_k)]
    if ro.prompt_template != prompts.PROMPT_TEMPLATE:
        words += ["--prompt-template", ro.prompt_template]
    if ro.chat_template:
        words += ["--chat-template"]
    for name in ("marker", "marker_prefill", "length_prefill"):
        if getattr(ro, name) != getattr(prompts, name.upper()):
            words += ["--" + name.replace("_", "-"), getattr(ro, name)]
    words += ["--max-cot-length", str(ro.max_cot_length), "--question", question]
    return " ".join(w if w.startswith("<") else shlex.quote(w) for w in words)


EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded GGUF was converted from


def base_model_id(model: str) -> str | None:
    """The hub id a model card names as its base_model: the hub id trained; the embedded model's original; for a
    folder, the base_model its own card names (a softtokens checkpoint trained again); else None."""
    from softtokens.models import EMBEDDED_MODEL, is_hub_id

    if model == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    card = Path(model) / "README.md"
    if card.is_file():
        text = card.read_text()
        front = text.split("---")[1] if text.startswith("---") else ""
        found = [line.split(":", 1)[1].strip() for line in front.splitlines() if line.startswith("base_model:")]
        return found[0] if found and found[0] else None
    return model if "/" in model and is_hub_id(model) else None


def model_card(cfg: TrainConfig, sigma: float) -> str:
    """README.md of a checkpoint: what a user needs to run the model as it was trained."""
    base, cot, ro = base_model_id(cfg.load.model), cfg.cot, cfg.rollout
    front = ["---", "library_name: transformers", *([f"base_model: {base}"] if base else []),
             "tags:", "- softtokens", "- soft-thinking", f"- {cot.mode}-cot", "---"]
    rows = [("base model", cfg.load.model), ("CoT mode", cot.mode), ("CoT temperature tau", cot.temperature),
            ("noise on", cot.noise_on + (f" (k = {cot.noise_top_k})" if cot.noise_on == "topk_logits" else "")),
            ("noise scale gamma", cot.gamma), ("sigma = gamma x RMS of what is noised", f"{sigma:.6g}"),
            ("chat template", ro.chat_template), ("stop marker", f'`"{ro.marker}"`'),
            ("prefill after the marker", f'`"{ro.marker_prefill}"`'),
            ("prefill at the length limit", f'`"{ro.length_prefill}"`'), ("max CoT length", ro.max_cot_length),
            ("dataset", cfg.data.dataset), ("reward", cfg.grading.reward or "Math-Verify 100 / 10 / 0")]
    return "\n".join([
        *front, "", f"# A {cot.mode}-CoT model trained with softtokens", "",
        "RL-trained with continuous chain-of-thought tokens (\"Soft Tokens, Hard Truths\", arXiv 2509.19170). "
        "This folder is an ordinary Hugging Face model: `AutoModelForCausalLM.from_pretrained` runs it with hard "
        "tokens. To run its CoT as it was trained, use the same prompt, marker and prefills:", "",
        "```bash", generate_command(cfg), "```", "",
        "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        "Prompt template (`{question}` is replaced by the question):", "", "```", ro.prompt_template, "```", ""])


def _write_dir(path: Path, write, card: str | None = None) -> Path:
    """Run ``write(folder)`` into ``<path>.tmp``, then swap it in: an existing folder is renamed to ``<path>.old``,
    the new one renamed to ``path``, and only then the old one deleted. A kill at any point leaves a whole folder
    under ``path``, or one that ``recover`` puts back."""
    path = Path(path)
    recover(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if card is not None:
        (tmp / "README.md").write_text(card)
    _write_checksums(tmp)
    if path.exists():  # recover() above has removed any earlier .old beside a whole folder
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def recover(path: Path) -> None:
    """After a kill between ``_write_dir``'s two renames (no ``path``, the old folder set aside): the new folder
    when it is whole (its checksums pass), else the old one, goes back under ``path``; an ``.old`` beside a whole
    folder is removed (a ``.tmp`` left over is removed by the next write)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        try:
            verify_checkpoint(tmp)
            tmp.rename(path)
        except (CorruptCheckpoint, OSError):
            old.rename(path)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)


def _options(policy, offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload) if policy.sharded else StateDictOptions()


def _model_state(policy) -> dict:
    """Full weights of the trained model (rank 0 holds them when sharded; a collective there)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    prefix = "model."  # Scorer holds the model as .model
    sd = get_model_state_dict(policy.scorer, options=_options(policy))
    sd = {k[len(prefix):]: v for k, v in sd.items()}
    model = policy.rollout.model
    if getattr(model.config, "tie_word_embeddings", False):  # gathered shards come back untied: save the head once
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        sd.pop(f"{head}.weight", None)
    return sd


def _write_hf(folder: Path, policy, model_state: dict) -> None:
    """A Hugging Face folder: the master weights, or with LoRA the merged model in the compute dtype."""
    model = policy.rollout.model
    if policy.lora:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, state_dict=model_state, safe_serialization=True)
    policy.lm.tokenizer.save_pretrained(folder)


def save_checkpoint(path: Path, policy, optimizer, scheduler, state: dict, d, card: str | None = None) -> Path:
    """The model as a Hugging Face folder plus trainer_state.pt (optimiser, scheduler, RNG, step, LoRA adapters).

    Every rank calls it (gathering shards is a collective); rank 0 writes.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from softtokens.distributed import barrier

    if policy.lora:  # its folder is the merged rollout copy; otherwise the master weights are written
        policy.sync_rollout()
    weights = _model_state(policy)
    optim = get_optimizer_state_dict(policy.scorer, optimizer, options=_options(policy))
    if d.main:
        trainable = {n for n, p in policy.lm.model.named_parameters() if p.requires_grad}
        extra = {"adapter": {n: v for n, v in weights.items() if n in trainable}} if policy.lora else {}

        def write(folder: Path) -> None:
            _write_hf(folder, policy, weights)
            torch.save({**state, **extra, "optimizer": optim, "scheduler": scheduler.state_dict(),
                        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, folder / STATE)

        _write_dir(path, write, card)
    barrier(d)
    return path


def save_model(path: Path, policy, d, card: str | None = None) -> Path:
    """The model and tokenizer only (the best checkpoint, the final export)."""
    from softtokens.distributed import barrier

    if policy.lora:
        policy.sync_rollout()
    weights = {} if policy.lora else _model_state(policy)
    if d.main:
        _write_dir(path, lambda folder: _write_hf(folder, policy, weights), card)
    barrier(d)
    return path


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload a checkpoint's model, tokenizer and card (not its optimiser state) to the hub; returns the URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=[STATE, CHECKSUMS],
                      commit_message=f"softtokens: {Path(folder).name}")
    return f"https://huggingface.co/{repo_id}"


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders, oldest first (a folder whose replacement was cut short put back first)."""
    for aside in Path(output_dir).glob("checkpoint-*.old"):
        recover(aside.with_name(aside.name.removesuffix(".old")))
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(weights, trainer state) of a checkpoint; an incomplete or unreadable one is a clear error."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / STATE).is_file() or not files:
        raise UsageError(f"checkpoint {path} is incomplete: it needs {STATE} and *.safetensors; delete it to resume "
                         "from an earlier one")
    try:
        weights = {}
        for w in files:
            weights.update(load_file(str(w)))
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  any unreadable file means a corrupt checkpoint
        raise UsageError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); delete it to resume from an "
                         "earlier one") from None
    return weights, state


def check_saved_weights(path: Path, saved: dict, model) -> None:
    """A checkpoint must hold exactly this model's tensors, at its shapes: never a silent partial load."""
    own = model.state_dict()
    missing = set(own) - set(saved)
    if getattr(model.config, "tie_word_embeddings", False):  # a tied head is saved once
        missing.discard("lm_head.weight")
    unexpected = set(saved) - set(own)
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, p in own.items():
        if name in saved and saved[name].shape != p.shape:
            raise UsageError(f"checkpoint {path} does not match the model: {name} is {tuple(saved[name].shape)}, "
                             f"the model's is {tuple(p.shape)}")


def restore(policy, optimizer, scheduler, state: dict, path: Path) -> dict:
    """Optimiser, scheduler and RNG from a trainer state (the weights went in when the policy was built)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = dict(state)
    state.pop("adapter", None)
    try:
        set_optimizer_state_dict(policy.scorer, optimizer, state.pop("optimizer"), options=_options(policy, False))
        scheduler.load_state_dict(state.pop("scheduler"))
    except Exception as e:  # noqa: BLE001  an optimiser state of other parameters, or of an older format
        raise UsageError(f"checkpoint {path}: its optimiser state does not fit this run ({type(e).__name__}: "
                         f"{str(e)[:200]}); delete it to resume from an earlier one") from None
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state
