"""Typed run configs, composed from sections: one dataclass per concern, each option declared once.

A command's config (``TrainConfig``, ``EvalConfig``, ``OODConfig``, ``GenerateConfig``) holds the sections it
uses. Each section checks its own values in its ``__post_init__`` and the command checks what spans sections, so
every bad value fails when the config is built, before a model loads. YAML files and flags name an option by its
flat name (``learning_rate: 1e-5``, ``--learning-rate``); the nested form (``optim: {learning_rate: 1e-5}``) is
accepted too. In Python an option is read and set on its section (``cfg.optim.learning_rate``); the library
passes a section down whole. A command may leave out options it has no use for, give one a name of its own (eval's
``--out`` is the output section's ``output_dir``) and its own default (a CoT of 128 tokens to train, 512 to
evaluate). Each field's docstring is its one description: the CLI's --help and docs/CONFIG.md.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import typing
from dataclasses import dataclass, fields
from typing import Literal, get_args

from softtokens import choices, prompts
from softtokens.choices import Correction, Estimator, Mode, NoiseOn
from softtokens.errors import UsageError

# The choice fields' values (the rest are in choices.py): a field is annotated with the Literal, checked against its
# tuple.
Protocol = Literal["cloze", "generate"]  # the OOD check's (ood.py)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
ReportTo = Literal["tensorboard", "wandb", "none"]
REPORT_TO: tuple[str, ...] = get_args(ReportTo)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
Engine = Literal["auto", "static", "hf"]
ENGINES: tuple[str, ...] = get_args(Engine)
SaveStrategy = Literal["steps", "no"]
SAVE_STRATEGIES: tuple[str, ...] = get_args(SaveStrategy)
# The paper's six inference settings (METHOD.md §6): the CoTConfig each one changes from a model's own.
SETTINGS = {
    "hard_greedy": dict(mode="hard", temperature=0.0),
    "hard_sample": dict(mode="hard", temperature=1.0),
    "soft_greedy": dict(mode="soft", noise=False),
    "soft_sample": dict(mode="soft"),
    "fuzzy_greedy": dict(mode="fuzzy", noise=False),
    "fuzzy_sample": dict(mode="fuzzy"),
}


def check_noise_on(mode: Mode, noise_on: NoiseOn, noise_top_k: int) -> None:
    one_of("noise_on", noise_on, choices.NOISE_ON)
    if noise_on != "embedding" and mode == "hard":
        raise UsageError(f"noise_on {noise_on} places the noise of a soft or fuzzy CoT; a hard CoT has none "
                         "(use mode soft or fuzzy, or noise_on embedding)")
    if noise_top_k < 1:
        raise UsageError(f"noise_top_k must be >= 1, got {noise_top_k}")


def check_seeds(seeds: list[int] | None) -> None:
    if seeds is None:
        return
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise UsageError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds repeats a seed: {seeds}")


def at_least(section, minimum: int, *names: str) -> None:
    """Each named field of ``section`` is >= ``minimum``; the error names the field."""
    for name in names:
        if getattr(section, name) is not None and getattr(section, name) < minimum:
            raise UsageError(f"{name} must be >= {minimum}, got {getattr(section, name)}")


def one_of(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def split_names(text: str) -> list[str]:
    """'gsm8k, math500,' -> ['gsm8k', 'math500'] (the comma-separated dataset and setting options)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (the --seeds flag)."""
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None


def parse_floats(text: str) -> list[float]:
    """'1,0.5' -> [1.0, 0.5] (the --reward-weights flag)."""
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated numbers such as 1,0.5, got {text!r}") from None


T = typing.TypeVar("T")


def resumable(default: T) -> T:
    """A field a resumed run may change (where it runs, how fast, what it logs and keeps): any other change makes
    another run. Kept in the field's metadata, which ``Command.fixed`` and docs/CONFIG.md read."""
    return dataclasses.field(default=default, metadata={"resumable": True})


def is_resumable(kind: type, name: str) -> bool:
    return bool(kind.__dataclass_fields__[name].metadata.get("resumable"))


# ---- the sections

@dataclass
class LoadConfig:
    """Which model, on what device and in what dtype."""

    model: str = "smollm2"
    """HF directory, hub id, .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct)."""
    device: str = resumable("auto")
    """cpu, cuda, cuda:N (auto: cuda when available)."""
    dtype: Dtype = "auto"
    """Compute dtype: float32, bfloat16, float16 (auto: bfloat16 on CUDA, float32 on CPU)."""
    base: str | None = None
    """The base model to compare against (same forms as model)."""

    def __post_init__(self):
        one_of("dtype", self.dtype, DTYPES)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UsageError(f"unknown device {self.device!r}: choose auto, cpu, cuda, cuda:N or mps")
        if not self.model.strip():
            raise UsageError("model must name a model: a folder, a hub id, a .gguf file or smollm2")


@dataclass
class LoraConfig:
    """LoRA adapters (peft) in place of training every weight."""

    use_peft: bool = False
    """Train LoRA adapters (peft) instead of every weight; checkpoints export the merged model."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the delta is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """[choice] LoRA dropout; 0 so that the policy scored is exactly the policy the rollouts sampled."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt (q_proj,v_proj,...), or all-linear."""

    def __post_init__(self):
        if self.use_peft:
            at_least(self, 1, "lora_r")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataConfig:
    """Which problems, and how a row of them is read."""

    dataset: str = "gsm8k_train"
    """Problems: a built-in name, a file (.jsonl / .csv / .parquet) or a hub name (deepscaler); eval and ood take several, comma-separated (--datasets)."""
    limit: int | None = None
    """Use only the first N problems of each dataset."""
    split: str = "train"
    """Split of a hub dataset (eval reads test by default)."""
    dataset_config: str | None = None
    """Configuration (subset) of a hub dataset, e.g. 'main' for openai/gsm8k."""
    question_key: str | None = None
    """Dataset column of the question (default: the first of question, problem, prompt). A column of chat messages ([{role, content}, ...]) is rendered with the tokenizer's chat template."""
    answer_key: str | None = None
    """Dataset column of the gold answer (default: the first of answer, final_answer, solution_answer)."""
    skip_bad: bool = False
    """Skip (and count) dataset rows without a usable question or answer instead of stopping at the first."""

    def __post_init__(self):
        if not split_names(self.dataset):
            raise UsageError("dataset must name at least one: a built-in name, a file or a hub name")
        if self.limit is not None:
            at_least(self, 1, "limit")

    def load_options(self, require_answer: bool = True) -> dict:
        """Keyword arguments of ``data.load_dataset`` (a custom reward may need no gold answer)."""
        return dict(question_key=self.question_key, answer_key=self.answer_key, skip_bad=self.skip_bad,
                    split=self.split, config=self.dataset_config, require_answer=require_answer)


@dataclass
class GradingConfig:
    """How a rollout is scored: your reward(s), or Math-Verify's."""

    reward: str = ""
    """Your reward(s), 'package.module:function' or 'path/to/file.py:function' (several: comma-separated, or a YAML list), called as TRL calls one: f(prompts=, completions=, completion_ids=, trainer_state=, answers=, cot_modes=, **columns) -> list of floats or None, or (rewards, correct); empty = Math-Verify's 100 / 10 / 0."""
    reward_weights: list[float] | None = None
    """Weights of the rewards' sum, one per reward (default: 1 each), as TRL's reward_weights."""
    reward_timeout: float = resumable(120.0)
    """Seconds a user reward may take for one batch; past it the run stops with an error naming the reward."""
    require_number: bool | None = None
    """[choice] Count a boxed answer as right only when it is a plain number: Math-Verify alone also accepts an equal expression such as 20 + 10, which a policy can learn to copy from the question. Unset: on when the data are the built-in sums tasks, off for the rest (the paper's grading)."""
    grading_workers: int = resumable(1)
    """Worker processes that grade while the next batch generates (0 grades inline, in the main thread)."""
    grading_timeout: float = resumable(5.0)
    """Seconds Math-Verify may spend per parse or comparison; a stuck answer scores 0."""

    def __post_init__(self):
        for name in ("reward_timeout", "grading_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        at_least(self, 0, "grading_workers")
        from softtokens.reward import check_reward_weights, split_rewards

        if self.reward:  # without one, the weights may be for the functions given to train(reward_fn=): checked there
            check_reward_weights(split_rewards(self.reward), self.reward_weights)


@dataclass
class CoTConfig:
    """How the chain of thought is fed back (METHOD.md §2, §6)."""

    mode: Mode = "soft"
    """CoT mode: hard (sampled token), soft (p E + noise, tau 0.5) or fuzzy (p E + noise, tau 1e-4)."""
    temperature: float | None = None
    """CoT temperature tau; default per mode (hard 1.0, soft 0.5, fuzzy 0.0001). 0 = argmax (hard only)."""
    gamma: float = choices.DEFAULT_GAMMA
    """Noise scale: sigma = gamma * RMS of what the noise is added to (the input-embedding matrix by default), computed once from the initial model."""
    noise: bool = True
    """Add Gaussian noise to soft/fuzzy CoT inputs; off gives the 'greedy' soft/fuzzy settings."""
    noise_on: NoiseOn = "embedding"
    """Where the noise goes (METHOD.md §10): embedding (the paper), hidden (the final hidden state), logits, or topk_logits (the noise_top_k logits, the rest -inf); all but embedding run on the HF engine."""
    noise_top_k: int = 5
    """Logits kept by noise_on topk_logits (the paper: 5 or 50, at tau 1.0)."""

    def __post_init__(self):
        one_of("CoT mode", self.mode, choices.MODES)
        if self.temperature is None:
            self.temperature = choices.DEFAULT_TEMPERATURE[self.mode]
        self.temperature = float(self.temperature)
        if self.mode == "hard" and self.temperature < 0:
            raise UsageError(f"temperature must be >= 0 for hard CoT (0 = greedy), got {self.temperature}")
        if self.mode != "hard" and not self.temperature > 0:
            raise UsageError(
                f"temperature must be > 0 for {self.mode} CoT (got {self.temperature}): the mixture "
                "softmax(z/tau) E is undefined at tau <= 0; use --mode hard --temperature 0 for argmax tokens"
            )
        if not self.gamma >= 0:
            raise UsageError(f"gamma must be >= 0, got {self.gamma}")
        check_noise_on(self.mode, self.noise_on, self.noise_top_k)

    @property
    def sampled(self) -> bool:
        """Whether the CoT is stochastic (a policy with a log-density) rather than greedy."""
        if self.mode == "hard":
            return self.temperature > 0
        return self.noise and self.gamma > 0

    def setting(self, name: str) -> CoTConfig:
        """The CoT of inference setting ``name`` for a model trained with this CoT: a setting of this mode keeps
        its temperature (not hard_greedy's 0) and noise placement; every sampled setting keeps gamma."""
        own = dict(SETTINGS[name], gamma=self.gamma)
        if own["mode"] == self.mode:
            own |= dict(noise_on=self.noise_on, noise_top_k=self.noise_top_k)
            if own.get("temperature") != 0.0:
                own["temperature"] = self.temperature
        return CoTConfig(**own)


@dataclass
class PromptConfig:
    """How a question becomes the prompt, and where the CoT ends (METHOD.md §3)."""

    prompt_template: str = prompts.PROMPT_TEMPLATE
    """Prompt around a text question ({question} is replaced by it; any other brace is text); chat-format questions are used as they are."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template as one user message (instruct models)."""
    marker: str = prompts.MARKER
    """The CoT ends as soon as its text (after stripping trailing whitespace) ends with this."""
    marker_prefill: str = prompts.MARKER_PREFILL
    """Forced tokens after a marker stop."""
    length_prefill: str = prompts.LENGTH_PREFILL
    """Forced tokens when the CoT hits max_cot_length (or ends on EOS)."""

    def __post_init__(self):
        prompts.check_template(self.prompt_template)
        if not self.marker.strip():
            raise UsageError("marker must be non-empty text")


@dataclass
class EngineConfig:
    """How rollouts are decoded (docs/ENGINE.md)."""

    engine: Engine = resumable("auto")
    """Decode engine: 'static' (static KV cache, CUDA-graph step; Llama/Qwen2), 'hf' (HF forward loop), 'auto' (static on CUDA when supported)."""
    cuda_graphs: bool = resumable(True)
    """Capture the static engine's decode step in CUDA graphs (off: run it eagerly, for debugging)."""
    compile_decoder: bool = resumable(True)
    """With CUDA graphs, also torch.compile the static decoder's layers and the step's token / phase logic (fuses norms, RoPE, SiLU, the vocabulary-wide sampling work); eager if it fails."""
    attention_kernel: bool = resumable(True)
    """Static engine: decode attention with the split-KV Triton kernel (CUDA, Triton; one graph for every length); off: SDPA over length buckets."""

    def __post_init__(self):
        one_of("engine", self.engine, ENGINES)


@dataclass
class RolloutConfig(PromptConfig, EngineConfig):
    """What a rollout generates around the CoT (METHOD.md §3), with its prompt and its engine."""

    max_cot_length: int = 512
    """CoT length limit L (the paper trains at 128 for GSM8K, 512 for MATH and DeepScaleR, and evaluates at 512)."""
    max_answer_length: int = 32
    """Answer tokens after the prefill; EOS ends the answer earlier."""
    answer_temperature: float = 1.0
    """Answer sampling temperature; 0 = greedy (evaluation's answers are always greedy)."""
    num_generations: int = 1
    """Rollouts per question (G, the RLOO group; in eval --num-samples, the samples of a sampled setting)."""
    seed: int = 0
    """Base seed; each row's noise comes from (seed, question, sample index), not from its batch; train also draws the problem order from it."""
    batch_size: int = resumable(64)
    """Rows (questions x generations) decoded together."""
    stop_at_eos: bool = True
    """[choice] An EOS token in the CoT (sampled, or the soft shadow) ends it like the length limit."""
    share_prompt: bool = resumable(True)
    """Compute each group's prompt once: one prefill copied to its G rollouts, and in training's scoring one pass over the prompt that its G continuations attend to (equal results; false repeats the prompt per row, for comparison)."""
    record_means: bool = resumable(False)
    """Keep mu_t of each soft/fuzzy step in the rollout (for checks; costs T x d floats per row)."""
    record_top_k: int = resumable(0)
    """Keep the k most likely tokens of p and their probabilities at each CoT step (for reading soft CoTs)."""
    antithetic: bool = False
    """Soft / fuzzy CoTs: pair each noise draw with its negation inside a group (samples 2k and 2k + 1), and in training take each sample's RLOO baseline over the other pairs so the estimator stays unbiased (needs an even num_generations >= 4). Not in the paper."""

    def __post_init__(self):
        PromptConfig.__post_init__(self)
        EngineConfig.__post_init__(self)
        at_least(self, 1, "max_cot_length", "max_answer_length", "num_generations", "batch_size")
        at_least(self, 0, "record_top_k", "seed")
        if self.answer_temperature < 0:
            raise UsageError(f"answer_temperature must be >= 0 (0 = greedy), got {self.answer_temperature}")


@dataclass
class OptimConfig:
    """The RL objective, the optimiser and its schedule."""

    prompts_per_step: int = 2
    """B: prompts per optimiser step."""
    estimator: Estimator = "rloo"
    """Advantage estimator: rloo (the paper) or grpo (std-normalised groups)."""
    beta: float = 0.0
    """KL penalty to a frozen copy of the initial model (k3 estimator); 0 = none, and no reference is loaded."""
    rollout_correction: Correction = "none"
    """Correct the rollout-scorer mismatch: none (the paper) or tis (truncated importance sampling: each rollout's loss weighted by min(exp(l_scored - l_rollout), tis_cap))."""
    tis_cap: float = 2.0
    """The cap C of truncated importance sampling's ratio (rollout_correction: tis)."""
    learning_rate: float = 6e-6
    """AdamW peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    max_steps: int = resumable(4000)
    """Optimiser steps (one per batch of B x G rollouts, on-policy)."""
    adam_beta1: float = 0.9
    """[choice] AdamW beta1."""
    adam_beta2: float = 0.999
    """[choice] AdamW beta2."""
    weight_decay: float = 0.0
    """[choice] AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """[choice] Gradient clipping norm; None = no clipping."""
    micro_batch_size: int = resumable(8)
    """Rollouts scored per backward pass (gradient accumulation over the B x G rollouts)."""
    skip_zero_advantage: bool = resumable(True)
    """Do not score rollouts whose advantage is 0 when no KL term needs them (they add nothing to the loss or its gradient); logged as train/rows_skipped."""
    mixed_precision: bool = True
    """[choice] With a bfloat16 dtype, keep float32 master weights and AdamW state (FSDP2 mixed precision); false trains bfloat16 weights directly (half the memory; small updates round away)."""
    gradient_checkpointing: bool = resumable(False)
    """Recompute activations in the backward pass (large models)."""
    disable_dropout: bool = True
    """Set every dropout of the model (and of LoRA) to 0: scoring runs in train mode, and dropout there would score another policy than the one that sampled (TRL's GRPOConfig defaults to false, its DPO config to true)."""
    cot_weight: float = 1.0
    """[departure] lambda, the weight of the CoT term in the loss -(1/BG) sum A (lambda l_cot + l_answer): 1 is the paper's estimator, 0 trains the answer only, 1/d averages a soft step's density over its coordinates (METHOD.md §11)."""
    mixture_embedding_grad: bool = True
    """[departure] Let the CoT term's gradient reach E through a soft step's mean mu = p E (the paper's estimator); false treats E there as a constant (METHOD.md §11)."""

    def __post_init__(self):
        at_least(self, 1, "prompts_per_step", "max_steps", "micro_batch_size")
        at_least(self, 0, "warmup_steps", "beta", "weight_decay")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        one_of("estimator", self.estimator, choices.ESTIMATOR_NAMES)
        one_of("rollout_correction", self.rollout_correction, choices.CORRECTIONS)
        if not self.tis_cap >= 1:
            raise UsageError(f"tis_cap must be >= 1 (a ratio of 1 is an unchanged rollout), got {self.tis_cap}")
        if not self.learning_rate > 0:
            raise UsageError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UsageError(f"max_grad_norm must be > 0, or null for no clipping, got {self.max_grad_norm}")
        if not self.cot_weight >= 0:
            raise UsageError(f"cot_weight must be >= 0, got {self.cot_weight}")


@dataclass
class OutputConfig:
    """Where a run writes, and whether it continues one."""

    output_dir: str = resumable("runs/train")
    """Output folder: the resolved config, and what the command writes (checkpoints and metrics; records and results)."""
    resume: bool = resumable(False)
    """Continue the interrupted run in the output folder, redoing nothing finished (its config must match, but for the options that may change on resume)."""
    seeds: list[int] | None = None
    """Several runs, one per seed, each in <output folder>/seed-N (--seeds 0,1,2); overrides seed. report gives their mean +- std."""

    def __post_init__(self):
        if not str(self.output_dir).strip():
            raise UsageError("the output folder must be a path")
        check_seeds(self.seeds)


@dataclass
class CheckpointConfig:
    """Checkpoints: how often, which, and the checks a resume makes."""

    save_steps: int = resumable(100)
    """Checkpoint every N steps (and always at the end and on SIGINT / SIGTERM); 0 = only then."""
    save_strategy: SaveStrategy = resumable("steps")
    """steps: checkpoints as save_steps says; no: none at all, not even the best or the last (a run that cannot resume; benchmarks)."""
    push_to_hub: str = resumable("")
    """A Hugging Face hub repo id ('user/name'): upload checkpoint-best (else the last checkpoint) at the end."""
    resume_from_previous: bool = resumable(False)
    """With --resume: when the last checkpoint fails its SHA-256 check, resume from the one before it."""
    allow_unverified: bool = resumable(False)
    """With --resume: accept a checkpoint that has no checksums.json (one written before softtokens kept it)."""

    def __post_init__(self):
        at_least(self, 0, "save_steps")
        one_of("save_strategy", self.save_strategy, SAVE_STRATEGIES)
        if self.save_strategy == "no" and self.push_to_hub:
            raise UsageError("push_to_hub needs a checkpoint to push: save_strategy must be steps")


@dataclass
class LoggingConfig:
    """What a training run logs, and where."""

    logging_steps: int = resumable(1)
    """Log metrics every N steps."""
    report_to: ReportTo = resumable("tensorboard")
    """Where metrics go besides metrics.jsonl: tensorboard, wandb (pip install wandb) or none."""
    run_name: str = resumable("")
    """W&B run name (default: the output folder's name, 'hard/seed-0' for a seed folder); the project is $WANDB_PROJECT, else softtokens."""
    log_completions: int = resumable(0)
    """Write the first N rollouts of each step (prompt, CoT text, answer, each reward, advantage) to completions.jsonl and a TensorBoard text panel (a W&B table); 0 = none."""
    gradient_signal: bool = resumable(False)
    """Log how much of each step's gradient is signal (signal/): the gradient norms of the CoT and answer terms, and the cosine between the gradients of two halves of the step's groups (overall and per term). The update is unchanged; each micro-batch costs one more backward pass (benchmarks/grad_signal.py)."""

    def __post_init__(self):
        at_least(self, 1, "logging_steps")
        at_least(self, 0, "log_completions")
        one_of("report_to", self.report_to, REPORT_TO)


@dataclass
class ValidationConfig:
    """What training evaluates while it runs."""

    val_size: int | None = None
    """[choice] Problems held out from the end of the training set for greedy validation. Unset: 100, at most a tenth of the data, and none when eval_steps is 0; config.yaml records the number used."""
    eval_steps: int = resumable(100)
    """Greedy validation every N steps (and at the end); the best checkpoint is kept; 0 = never."""
    eval_before_after: int = 0
    """Evaluate the first N problems of eval_dataset (greedy CoT in eval_mode, greedy answer) before and after training, with 95% intervals; 0 = skip."""
    eval_dataset: str = "gsm8k"
    """The held-out set of the before / after check (sums_test for the demo)."""
    eval_mode: Mode = "hard"
    """CoT mode of the before / after check, greedy: hard is the trained model deployed as a plain checkpoint."""
    ood_limit: int = 0
    """Score the first N items of HellaSwag, ARC-Challenge and MMLU before and after training and print the change; 0 = skip."""
    metric_for_best_model: str = "accuracy"
    """What checkpoint-best follows (higher is better), as TRL's option: accuracy (greedy validation), reward (its mean reward) or one user reward by its function's name."""

    def __post_init__(self):
        at_least(self, 0, "val_size", "eval_steps", "eval_before_after", "ood_limit")
        if not self.metric_for_best_model.strip():
            raise UsageError("metric_for_best_model must be accuracy, reward or a reward's name")
        one_of("eval_mode", self.eval_mode, choices.MODES)


@dataclass
class InferenceConfig:
    """Which inference settings an evaluation runs, and what it keeps."""

    settings: str = "all"
    """Comma-separated settings (hard_greedy, hard_sample, soft_greedy, soft_sample, fuzzy_greedy, fuzzy_sample) or 'all'."""
    save_cot_text: bool = resumable(True)
    """Keep each sample's CoT text (the shadow text for soft/fuzzy) in the per-problem records."""

    def __post_init__(self):
        self.names()

    def names(self) -> list[str]:
        names = list(SETTINGS) if self.settings.strip() == "all" else split_names(self.settings)
        unknown = [s for s in names if s not in SETTINGS]
        if unknown or not names:
            raise UsageError(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)} or 'all'")
        return names


@dataclass
class ProtocolConfig:
    """How the out-of-domain check asks its multiple-choice questions (METHOD.md §7)."""

    protocol: Protocol = "cloze"
    """cloze: rank the choices' texts by likelihood (lm-eval's acc, acc_norm) and the correct one's NLL; generate: lettered choices in the prompt, a greedy hard CoT and answer, graded by letter or text (the paper's Table 2 success rate)."""

    def __post_init__(self):
        one_of("protocol", self.protocol, PROTOCOLS)


# ---- a command's config: its sections, and the names, defaults and options it takes of them.

@functools.cache
def sections(cls) -> dict[str, type]:
    """Section attribute -> section class of a command's config."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


@functools.cache
def layout(cls) -> dict[str, tuple[str, str]]:
    """A command's options: flat name -> (section attribute, field), in the order the sections declare them."""
    names = {field: flat for flat, field in cls.aliases.items()}
    out = {}
    for attr, kind in sections(cls).items():
        for f in fields(kind):
            if f.name not in cls.exclude:
                flat = names.get(f.name, f.name)
                assert flat not in out and flat not in sections(cls), f"{cls.__name__}: {flat} twice"
                out[flat] = (attr, f.name)
    return out


def section_names(cls) -> dict[str, tuple[str, type]]:
    """The keys of the nested form: each section attribute, and each section's own parts (rollout's prompt and
    engine) -> (section attribute, class whose fields it holds)."""
    out = {}
    for attr, kind in sections(cls).items():
        out[attr] = (attr, kind)
        for part in kind.__mro__[1:]:
            if "__dataclass_fields__" in part.__dict__:
                out[part.__name__.removesuffix("Config").lower()] = (attr, part)
    return out


def _unknown(cls, keys, source: str) -> UsageError:
    import difflib

    from softtokens.trl_names import trl_hint

    if hint := next((h for k in keys if (h := trl_hint(str(k)))), None):  # TRL's name for an option: one line
        return UsageError(f"{source}: {hint}")
    known = list(layout(cls))
    near = {k: difflib.get_close_matches(k, known, n=1, cutoff=0.6) for k in keys}
    suggest = "; ".join(f"{k}: did you mean {m[0]}?" for k, m in near.items() if m)
    return UsageError(f"{source}: unknown key(s) {', '.join(map(str, keys))}" + (f" ({suggest})" if suggest else "")
                      + f"; valid keys: {', '.join(sorted(known))} (or nested under {', '.join(section_names(cls))})")


# an option's former name -> (its name, what it is): the old name still works, with a one-line note
RENAMED = {"top_k": ("noise_top_k", "the logits that get noise under noise_on topk_logits, not a sampling option")}


def renamed(key: str, source: str) -> str:
    """An option's current name; a former one is taken with a note on stderr."""
    if key not in RENAMED:
        return key
    new, what = RENAMED[key]
    print(f"softtokens: note: {source}: {key} is now {new} ({what})", file=sys.stderr)
    return new


def flatten(cls, values: dict, source: str = "config") -> dict:
    """The flat form of a mapping that may nest options under their section (``optim: {learning_rate: 1e-5}``)."""
    opts, parts, out = layout(cls), section_names(cls), {}
    unknown = []
    values = {renamed(k, source) if isinstance(k, str) and k not in opts and k not in parts else k: v
              for k, v in values.items()}
    for key, value in values.items():
        if key in parts and isinstance(value, dict):
            attr, part = parts[key]
            names = {g.name for g in fields(part)}
            own = {flat for flat, (a, f) in opts.items() if a == attr and f in names}
            by_field = {opts[flat][1]: flat for flat in own}
            for inner, v in value.items():
                inner = inner if inner in own or inner in by_field else renamed(inner, source)
                flat = inner if inner in own else by_field.get(inner)
                if flat is None:
                    raise UsageError(f"{source}: {key} has no option {inner!r}; its options: {', '.join(sorted(own))}")
                if flat in out:
                    raise UsageError(f"{source}: {flat} is given twice")
                out[flat] = v
        elif key in opts:
            if key in out:
                raise UsageError(f"{source}: {key} is given twice")
            out[key] = value
        elif key in sections(cls) and dataclasses.is_dataclass(value):
            out[key] = value  # a whole section (dataclasses.replace passes them)
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(cls, unknown, source)
    return out


C = typing.TypeVar("C", bound="Command")


def joined(value, hint):
    """A list of names given for a text option (rewards, datasets: from YAML or Python) as the comma-separated text
    the option holds."""
    if isinstance(value, (list, tuple)) and str in value_types(hint) and all(isinstance(x, str) for x in value):
        return ",".join(value)
    return value


class Command:
    """Base of a command's config (a dataclass whose fields are its sections); built from flat or nested
    options, or from whole sections."""

    exclude: tuple[str, ...] = ()  # section fields this command does not take (they keep the section's default)
    aliases: dict[str, str] = {}  # this command's name for a field -> the field
    defaults: dict[str, object] = {}  # field -> this command's default, where it is not the section's
    notes: dict[str, str] = {}  # option -> what it means in this command, where the field's docstring is not enough

    def __init__(self, **values):
        opts = layout(type(self))
        given = {attr: {} for attr in sections(type(self))}
        whole = {}
        for key, value in flatten(type(self), values, type(self).__name__).items():
            if key in given:
                whole[key] = value
            else:
                attr, name = opts[key]
                given[attr][name] = joined(value, option_types(type(self))[key])
        for attr, kind in sections(type(self)).items():
            if attr in whole:  # copied, so that no two configs share a section
                base = {f.name: getattr(whole[attr], f.name) for f in fields(kind)}
            else:
                base = {f.name: self.defaults[f.name] for f in fields(kind) if f.name in self.defaults}
            object.__setattr__(self, attr, self._build(kind, base | given[attr]))
        self.__post_init__()

    def _build(self, kind: type, values: dict):
        """The section, its error naming an option as this command calls it (eval's num_samples)."""
        try:
            return kind(**values)
        except UsageError as e:
            text = str(e)
            for flat, field in self.aliases.items():
                text = re.sub(rf"\b{field}\b", flat, text)
            raise UsageError(text) from None

    def __post_init__(self):
        """What spans sections; each section has checked its own values."""

    def __setattr__(self, name: str, value) -> None:
        """A command's sections are set when it is built; an option is set on its section
        (``cfg.optim.learning_rate = 1e-5``), so a flat or misspelt name fails instead of adding an attribute that
        nothing reads."""
        where = layout(type(self)).get(name)
        raise AttributeError(f"{type(self).__name__}.{name}: " + (f"set it on its section, cfg.{where[0]}.{where[1]}"
                                                                  if where else "no such option"))

    def checked(self):
        """This config built again from its values, each checked as when it was constructed: a field set after
        construction (``cfg.optim.learning_rate = -5``) fails here, naming the option, as it would have then."""
        return config_from_dict(type(self), self.flat(), type(self).__name__)

    def flat(self) -> dict:
        """Every option by its flat name: what config.yaml / config.json keep and a resume compares."""
        return {name: getattr(getattr(self, attr), field) for name, (attr, field) in layout(type(self)).items()}

    @classmethod
    def fixed(cls) -> list[str]:
        """The options a resume may not change: all but the fields declared ``resumable(...)``."""
        return [name for name, (attr, field) in layout(cls).items() if not is_resumable(sections(cls)[attr], field)]

    def resume_changes(self, saved: dict, now: dict | None = None) -> list[str]:
        """'name: old -> new' for each option of the saved run (config.yaml / config.json) that a resume may not
        change: the one rule of train, eval and ood. ``now``: this run's record, when it is not ``flat()``. A null
        the saved run resolved later (a mode's default temperature) is resolved as this config resolves it."""
        from softtokens.outdir import differences

        now = self.flat() if now is None else now
        unset = {k: v for k, v in saved.items() if v is None and k in layout(type(self))}
        if unset:
            try:
                resolved = config_from_dict(type(self), {k: v for k, v in saved.items() if k in layout(type(self))})
                saved = saved | {k: resolved.flat()[k] for k in unset}
            except (ValueError, TypeError):  # a record this version cannot rebuild: compared as it is
                pass
        return differences(saved, now, self.fixed())

    @classmethod
    def resumable_options(cls) -> list[str]:
        """The options a resume may change (the fields declared ``resumable(...)``, by their flat names)."""
        return [name for name in layout(cls) if name not in cls.fixed()]


@dataclass(init=False)
class TrainConfig(Command):
    """An RL run (METHOD.md §5). The defaults are the paper's; YAML files under configs/ set the rest."""

    load: LoadConfig
    lora: LoraConfig
    data: DataConfig
    grading: GradingConfig
    cot: CoTConfig
    rollout: RolloutConfig
    optim: OptimConfig
    output: OutputConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    validation: ValidationConfig

    exclude = ("base", "limit", "noise", "record_means", "record_top_k")
    aliases = {"rollout_batch_size": "batch_size"}
    defaults = {"max_cot_length": 128, "num_generations": 32}
    notes = {"rollout_batch_size": "Rows (prompts x generations) decoded together during rollouts.",
             "seed": "Seeds the problem order and every rollout."}

    def __post_init__(self):
        if self.optim.estimator == "rloo" and self.rollout.num_generations < 2:
            raise UsageError("rloo needs num_generations >= 2")
        if self.rollout.antithetic:
            if self.cot.mode == "hard" or not self.cot.sampled:
                raise UsageError("antithetic pairs the noise of a sampled soft or fuzzy CoT: use mode soft or fuzzy")
            if self.optim.estimator != "rloo" or self.rollout.num_generations < 4 or self.rollout.num_generations % 2:
                raise UsageError("antithetic needs estimator rloo and an even num_generations >= 4 (each sample's "
                                 f"baseline leaves out its pair), got {self.optim.estimator} with "
                                 f"{self.rollout.num_generations}")


@dataclass(init=False)
class EvalConfig(Command):
    """An evaluation in the paper's six inference settings (METHOD.md §6)."""

    load: LoadConfig
    data: DataConfig
    grading: GradingConfig
    inference: InferenceConfig
    cot: CoTConfig
    rollout: RolloutConfig
    output: OutputConfig

    exclude = ("base", "noise", "answer_temperature", "record_means", "record_top_k", "antithetic")
    aliases = {"datasets": "dataset", "num_samples": "num_generations", "out": "output_dir"}
    defaults = {"dataset": "gsm8k,math500,olympiadbench", "split": "test", "num_generations": 32,
                "answer_temperature": 0.0, "grading_workers": 2, "output_dir": "runs/eval"}
    notes = {"num_samples": "Samples per problem in the sampled settings (greedy settings take one); pass@k for k <= this.",
             "mode": "The CoT mode the model was trained with: its settings use temperature, noise_on and noise_top_k "
                     "(a sweep's model in its own settings); gamma is every sampled setting's.",
             "temperature": "The trained mode's CoT temperature (default per mode: hard 1.0, soft 0.5, fuzzy 0.0001); "
                            "hard_greedy stays at 0."}


@dataclass(init=False)
class OODConfig(Command):
    """The out-of-domain check (METHOD.md §7): multiple-choice accuracy and answer NLL, against a base model."""

    load: LoadConfig
    data: DataConfig
    check: ProtocolConfig
    rollout: RolloutConfig
    output: OutputConfig

    exclude = ("split", "dataset_config", "question_key", "answer_key", "skip_bad", "answer_temperature",
               "max_answer_length", "num_generations", "seed", "stop_at_eos", "share_prompt", "record_means",
               "record_top_k", "antithetic", "seeds",
               *(f.name for f in fields(PromptConfig)), *(f.name for f in fields(EngineConfig)))
    aliases = {"datasets": "dataset", "out": "output_dir"}
    defaults = {"dataset": "hellaswag,arc_challenge,mmlu", "batch_size": 32, "max_cot_length": 256,
                "answer_temperature": 0.0, "output_dir": "runs/ood"}
    notes = {"datasets": "Comma-separated: hellaswag, arc_challenge, arc_easy, mmlu, or .jsonl files in that schema.",
             "batch_size": "Sequences (item x choice) per forward pass; items decoded together with protocol generate.",
             "max_cot_length": "CoT length limit of protocol generate."}


@dataclass(init=False)
class GenerateConfig(Command):
    """``softtokens generate``: answer questions with a CoT of any mode and show it."""

    load: LoadConfig
    cot: CoTConfig
    rollout: RolloutConfig

    exclude = ("base", "record_means", "record_top_k", "antithetic")
    defaults = {"answer_temperature": 0.0}  # a greedy answer shows what the CoT led to


@functools.cache
def _docstrings(path: str) -> dict[str, dict[str, str]]:
    """Class name -> {field: the string under it} for every class of a source file, parsed once."""
    import ast

    out = {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ClassDef):
            out[node.name] = {a.target.id: str(b.value.value) for a, b in zip(node.body, node.body[1:])
                              if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                              and isinstance(b.value, ast.Constant)}
    return out


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Field name -> its docstring, read from the class source (the single place options are described)."""
    import inspect

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if "__dataclass_fields__" in k.__dict__]):
        docs |= _docstrings(inspect.getsourcefile(klass))[klass.__name__]
    assert set(docs) == {f.name for f in fields(cls)}, f"every field of {cls.__name__} needs a docstring"
    return docs


@functools.cache
def option_docs(cls) -> dict[str, str]:
    """A command's option -> its description: the field's docstring, or the command's note."""
    return {flat: cls.notes.get(flat) or field_docs(sections(cls)[attr])[field]
            for flat, (attr, field) in layout(cls).items()}


@functools.cache
def option_types(cls) -> dict[str, object]:
    """A command's option -> the type hint of its field."""
    hints = {attr: typing.get_type_hints(kind) for attr, kind in sections(cls).items()}
    return {flat: hints[attr][field] for flat, (attr, field) in layout(cls).items()}


def option_defaults(cls) -> dict[str, object]:
    """A command's option -> its default in this command."""
    out = {}
    for flat, (attr, field) in layout(cls).items():
        f = sections(cls)[attr].__dataclass_fields__[field]
        out[flat] = cls.defaults.get(field, f.default)
    return out


def by_section(cfg: Command) -> dict[str, dict]:
    """A command's options nested under their sections, {section: {option: value}}: the nested form a --config
    file may hold (what ``train --dry-run`` prints)."""
    out: dict[str, dict] = {}
    for flat, (attr, field) in layout(type(cfg)).items():
        out.setdefault(attr, {})[flat] = getattr(getattr(cfg, attr), field)
    return out


def choice_values(hint) -> tuple[str, ...]:
    """The values of a choice field (one annotated with a Literal, or an Optional of one); () for any other."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is Literal:
            return typing.get_args(h)
    return ()


def value_types(hint) -> list:
    """The types a field's value may take: an Optional's members, a Literal's values being strings."""
    if typing.get_origin(hint) is Literal:
        return [str]
    members = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return [str if typing.get_origin(a) is Literal else a for a in members]


def config_from_dict(cls: type[C], values: dict, source: str = "config") -> C:
    """A command's config from a mapping (a YAML file, overrides; flat or nested), naming any unknown key or wrong
    type."""
    hints, out = option_types(cls), {}
    for key, value in flatten(cls, values, source).items():
        kinds = value_types(hints[key])
        if value is None and type(None) in typing.get_args(hints[key]):
            out[key] = None
        elif any(typing.get_origin(k) is list for k in kinds):
            floats = float in typing.get_args(next(k for k in kinds if typing.get_origin(k) is list))
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = (parse_floats if floats else parse_seeds)(value)
            if not isinstance(value, list):
                raise UsageError(f"{source}: {key} must be a list such as [0, 1, 2], got {value!r}")
            if floats:
                value = parse_floats(",".join(str(x) for x in value))
            out[key] = value
        elif str in kinds and isinstance(value, list) and all(isinstance(x, str) for x in value):
            out[key] = value  # reward: [a.py:f, b.py:g], joined by the command
        elif bool in kinds:
            if not isinstance(value, bool):
                raise UsageError(f"{source}: {key} must be true or false, got {value!r}")
            out[key] = value
        elif float in kinds and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads 6e-6 (no dot) as a string
                out[key] = float(value)
            except ValueError:
                raise UsageError(f"{source}: {key} must be a number, got {value!r}") from None
        elif int in kinds and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
        elif str in kinds and isinstance(value, str):
            out[key] = value
        else:
            want = " or ".join(k.__name__ for k in kinds)
            raise UsageError(f"{source}: {key} must be {want}, got {value!r}")
    return cls(**out)


COMMANDS = {"train": TrainConfig, "eval": EvalConfig, "ood": OODConfig, "generate": GenerateConfig}


def options_markdown() -> str:
    """docs/CONFIG.md: every option of every command by section, with its default and its description."""
    out = ["# Options", "",
           "Every option of every command, by section, with its default in that command and what it does; generated "
           "from the config classes (`python -m softtokens.config > docs/CONFIG.md`; a test keeps this file current). "
           "In YAML an option is a key, flat (`learning_rate: 1e-5`) or nested under its section "
           "(`optim: {learning_rate: 1e-5}`); on the command line a flag (`--learning-rate 1e-5`, "
           "`--learning_rate` or `--optim.learning-rate`). A section is one dataclass of `softtokens/config.py`, declared once and shared by "
           "the commands that use it; the options a resumed run may change are marked *resumable*. In Python an option "
           "is read on its section: `cfg.optim.learning_rate`.", ""]
    for command, cls in COMMANDS.items():
        docs, defaults, opts = option_docs(cls), option_defaults(cls), layout(cls)
        out += [f"## {command} (`{cls.__name__}`)", ""]
        for key, (attr, part) in section_names(cls).items():
            kind = sections(cls)[attr]
            names = [n for n, (a, f) in opts.items() if a == attr and _declaring(kind, f) is part]
            if names:
                where = "" if key == attr else f" (in Python: `cfg.{attr}.<option>`)"
                out += [f"### {key}: {part.__doc__.split(chr(10))[0].rstrip('.')}{where}", "",
                        "| option | default | what it does |", "|---|---|---|"]
                out += [f"| `{n}` | `{defaults[n]!r}` | {docs[n].replace('|', '/')}"
                        + (" *resumable*" if is_resumable(kind, opts[n][1]) else "") + " |" for n in names]
                out.append("")
    return "\n".join(out)


def _declaring(kind: type, field: str) -> type:
    """The class in ``kind``'s bases whose body declares ``field``."""
    return next(k for k in kind.__mro__ if field in k.__dict__.get("__annotations__", {}))


if __name__ == "__main__":
    print(options_markdown(), end="")
