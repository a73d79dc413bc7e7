"""The trained policy: master weights (optionally LoRA adapters), sharded with FSDP2, and a plain copy for rollouts.

- **Mixed precision.** On a bfloat16 run the trained weights and AdamW state
  stay float32 and compute runs in bfloat16 (FSDP2's ``MixedPrecisionPolicy``,
  gradients reduced in float32): at the paper's learning rates an update is far
  below bfloat16's resolution of a weight and would mostly round away.
- **FSDP2.** Under torchrun (or for mixed precision on one GPU) every decoder
  layer and then the ``Scorer`` root are ``fully_shard``-ed: parameters,
  gradients and optimiser state are split over the ranks.
- **The rollout copy.** Decoding gathers nothing per step: once per rollout
  phase ``sync_rollout`` writes the full weights (LoRA deltas merged in) into a
  plain Hugging Face model in the compute dtype, in place, so the static
  engine's captured graphs stay valid. Without sharding, LoRA or mixed
  precision the copy is the trained model itself.
- **LoRA** (peft): the base weights stay frozen in the compute dtype, the
  adapters train in float32; checkpoints export the merged model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from softtokens.checkpoint import check_saved_weights, read_checkpoint
from softtokens.config import TrainConfig
from softtokens.distributed import Dist
from softtokens.models import _DTYPES, CausalLM, disable_dropout, load_model, set_activation_checkpointing
from softtokens.scoring import Scorer
from softtokens.errors import UsageError


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather on every rank when it is an FSDP2 shard)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass
class Policy:
    """The model being trained, and the two ways the trainer sees it: scoring (with gradients) and rollouts."""

    lm: CausalLM
    """The trained model (peft-wrapped with LoRA); its layers are FSDP2 modules when sharded."""
    scorer: Scorer
    """Scores rollouts under ``lm``: the FSDP2 root when sharded."""
    rollout: CausalLM
    """What rollouts and greedy validation decode with: a plain model in the compute dtype (or ``lm`` itself)."""
    sharded: bool
    lora: bool

    @classmethod
    def plain(cls, lm: CausalLM) -> "Policy":
        """One process, every weight trained in its own dtype: the model rolls out itself."""
        return cls(lm, Scorer(lm), lm, False, False)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.scorer.parameters() if p.requires_grad]

    def full_weights(self):
        """(name, tensor) in the plain model's names, LoRA merged; a collective when sharded (every rank calls)."""
        model = self.lm.model.get_base_model() if self.lora else self.lm.model
        layers = {}
        if self.lora:
            from peft.tuners.lora import LoraLayer

            layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        for name, p in model.named_parameters():
            if ".lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            w = _full(p.detach())
            owner = layers.get(name.rsplit(".", 1)[0])
            if owner is not None and name.endswith(".weight"):
                a, b = (_full(owner.lora_A["default"].weight.detach()), _full(owner.lora_B["default"].weight.detach()))
                delta = (b.float() @ a.float()) * owner.scaling["default"]
                w = (w.float() + (delta.T if owner.fan_in_fan_out else delta)).to(w.dtype)
            yield name, w

    @torch.no_grad()
    def sync_rollout(self) -> None:
        """Copy the current weights into the rollout model, in place."""
        if self.rollout is self.lm:
            return
        params = dict(self.rollout.model.named_parameters())
        for name, w in self.full_weights():
            params[name].copy_(w)


def _shard(scorer: Scorer, compute: torch.dtype, d: Dist) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = scorer.lm.device.type
    mesh = init_device_mesh(device, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in scorer.lm.base.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(scorer, mesh=mesh, mp_policy=mp)  # the root: embeddings, final norm, output head


def plan(cfg: TrainConfig, dtype: str, world: int) -> tuple[str, bool]:
    """(dtype of the trained weights, whether to shard with FSDP2) for a run."""
    mixed = cfg.optim.mixed_precision and dtype in ("bfloat16", "float16")
    master = dtype if cfg.lora.use_peft or not mixed else "float32"
    return master, world > 1 or (master != dtype)


def build(cfg: TrainConfig, device: str, dtype: str, d: Dist, resume: Path | None = None,
          lm: CausalLM | None = None) -> tuple[Policy, dict | None]:
    """Load, optionally wrap with LoRA, and shard the model; with ``resume``, from that checkpoint's weights.

    Returns the policy and the checkpoint's trainer state (None for a fresh run).
    """
    master, sharded = plan(cfg, dtype, d.world)
    if lm is None:
        lm = load_model(cfg.load.model, dtype=master, device=device)
    state = None
    if resume is not None:
        weights, state = read_checkpoint(resume)
        if not cfg.lora.use_peft:  # a LoRA checkpoint's folder holds the merged model; its adapters are in the state
            check_saved_weights(resume, weights, lm.model)
            lm.model.load_state_dict(weights, strict=False)
    if cfg.optim.gradient_checkpointing:
        set_activation_checkpointing(lm.model)
    rollout = lm
    if sharded or cfg.lora.use_peft or master != dtype:
        rollout = CausalLM(_copy_in(lm.model, _DTYPES[dtype]).eval(), lm.tokenizer, lm.name)
    if cfg.lora.use_peft:
        lm = CausalLM(_lora(lm.model, cfg), lm.tokenizer, lm.name)
        if state is not None:
            adapter = state.get("adapter") or {}
            own = {n for n, p in lm.model.named_parameters() if p.requires_grad}
            if set(adapter) != own:
                raise UsageError(f"checkpoint {resume} does not match this LoRA configuration: it holds "
                                 f"{len(adapter)} adapter tensors, the model has {len(own)}")
            lm.model.load_state_dict(adapter, strict=False)
    if cfg.optim.disable_dropout:
        disable_dropout(lm.model)
    scorer = Scorer(lm)
    if sharded:
        _shard(scorer, _DTYPES[dtype], d)
    policy = Policy(lm, scorer, rollout, sharded, cfg.lora.use_peft)
    policy.sync_rollout()
    return policy, state


def _copy_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the model with its parameters in ``dtype``, made without a second full-precision copy
    (peak memory: the model plus the copy). Tied parameters stay tied; buffers keep their dtype."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _lora(model, cfg: TrainConfig):
    try:
        import peft
    except ImportError:
        raise UsageError("use_peft needs the peft package: pip install 'softtokens[lora]'") from None
    targets = cfg.lora.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(r=cfg.lora.lora_r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]):  # the same adapters on every rank (each shards its own copy) and run
            torch.manual_seed(cfg.rollout.seed)
            return peft.get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"lora_target_modules {cfg.lora.lora_target_modules!r}: {e}") from None
