"""Typed run configs. Each field's docstring is its one description (it is also the CLI --help).

Derived values (the mode's default tau) are resolved in one ``__post_init__``;
validation names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from softtokens import cot, prompts
from softtokens.estimators import CORRECTIONS
from softtokens.errors import UsageError


def check_noise_on(mode: str, noise_on: str, top_k: int) -> None:
    if noise_on not in cot.NOISE_ON:
        raise UsageError(f"unknown noise_on {noise_on!r}: choose one of {', '.join(cot.NOISE_ON)}")
    if noise_on != "embedding" and mode == "hard":
        raise UsageError(f"noise_on {noise_on} places the noise of a soft or fuzzy CoT; a hard CoT has none "
                         "(use mode soft or fuzzy, or noise_on embedding)")
    if top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")


def check_seeds(seeds: list[int] | None) -> None:
    if seeds is None:
        return
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise UsageError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds repeats a seed: {seeds}")


def split_names(text: str) -> list[str]:
    """'gsm8k, math500,' -> ['gsm8k', 'math500'] (the comma-separated dataset and setting options)."""
    return [x.strip() for x in text.split(",") if x.strip()]


PROTOCOLS = ("cloze", "generate")  # the OOD check's (ood.py)


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


@dataclass
class CoTConfig:
    """How the chain of thought is fed back (METHOD.md §2, §6)."""

    mode: str = "soft"
    """CoT mode: hard (sampled token), soft (p E + noise, tau 0.5) or fuzzy (p E + noise, tau 1e-4)."""
    temperature: float | None = None
    """CoT temperature tau; default per mode (hard 1.0, soft 0.5, fuzzy 0.0001). 0 = argmax (hard only)."""
    gamma: float = cot.DEFAULT_GAMMA
    """Noise scale: sigma = gamma * RMS of what the noise is added to (the input-embedding matrix by default)."""
    noise: bool = True
    """Add Gaussian noise to soft/fuzzy CoT inputs; off gives the 'greedy' soft/fuzzy settings."""
    noise_on: str = "embedding"
    """Where the noise goes (METHOD.md §10): embedding (the paper), hidden (the final hidden state), logits, or topk_logits (the top_k logits, the rest -inf)."""
    top_k: int = 5
    """Logits kept by noise_on topk_logits (the paper: 5 or 50, at tau 1.0)."""

    def __post_init__(self):
        if self.mode not in cot.MODES:
            raise UsageError(f"unknown CoT mode {self.mode!r}: choose one of {', '.join(cot.MODES)}")
        if self.temperature is None:
            self.temperature = cot.DEFAULT_TEMPERATURE[self.mode]
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
        check_noise_on(self.mode, self.noise_on, self.top_k)

    @property
    def sampled(self) -> bool:
        """Whether the CoT is stochastic (a policy with a log-density) rather than greedy."""
        if self.mode == "hard":
            return self.temperature > 0
        return self.noise and self.gamma > 0


@dataclass
class EngineOptions:
    """How rollouts are decoded (docs/ENGINE.md): shared by generate, train and eval, declared here once."""

    engine: str = "auto"
    """Decode engine: 'static' (static KV cache, CUDA-graph step; Llama/Qwen2), 'hf' (HF forward loop), 'auto' (static on CUDA when supported)."""
    cuda_graphs: bool = True
    """Capture the static engine's decode step in CUDA graphs (off: run it eagerly, for debugging)."""
    compile_decoder: bool = True
    """With CUDA graphs, also torch.compile the static decoder's layers and the step's token / phase logic (fuses norms, RoPE, SiLU, the vocabulary-wide sampling work); eager if it fails."""
    attention_kernel: bool = True
    """Static engine: decode attention with the split-KV Triton kernel (CUDA, Triton; one graph for every length); off: SDPA over length buckets."""

    def check_engine(self) -> None:
        if self.engine not in ("auto", "static", "hf"):
            raise UsageError(f"unknown engine {self.engine!r}: choose auto, static or hf")

    def engine_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(EngineOptions)}


@dataclass
class PromptOptions:
    """How a question becomes the prompt (METHOD.md §3): shared by generate, train and eval, declared here once."""

    prompt_template: str = prompts.PROMPT_TEMPLATE
    """Prompt around a text question ({question} is replaced by it); chat-format questions are used as they are."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template as one user message (instruct models)."""

    def prompt_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(PromptOptions)}


@dataclass
class RolloutConfig(EngineOptions, PromptOptions):
    """What a rollout generates around the CoT (METHOD.md §3)."""

    max_cot_length: int = 512
    """CoT length limit L (training: 128 for GSM8K, 512 for MATH; evaluation: 512)."""
    max_answer_length: int = 32
    """Answer tokens after the prefill; EOS ends the answer earlier."""
    answer_temperature: float = 1.0
    """Answer sampling temperature; 0 = greedy (evaluation always uses greedy answers)."""
    num_generations: int = 1
    """Rollouts per question (G)."""
    seed: int = 0
    """Base seed; each row's noise comes from (seed, question, sample index), not from its batch."""
    batch_size: int = 64
    """Rows (questions x generations) decoded together in one forward pass."""
    marker: str = prompts.MARKER
    """The CoT ends as soon as its text (after stripping trailing whitespace) ends with this."""
    marker_prefill: str = prompts.MARKER_PREFILL
    """Forced tokens after a marker stop."""
    length_prefill: str = prompts.LENGTH_PREFILL
    """Forced tokens when the CoT hits max_cot_length (or ends on EOS)."""
    stop_at_eos: bool = True
    """[choice] An EOS token in the CoT (sampled, or the soft shadow) ends it like the length limit."""
    record_means: bool = False
    """Keep mu_t of each soft/fuzzy step in the rollout (for checks; costs T x d floats per row)."""
    record_top_k: int = 0
    """Keep the k most likely tokens of p and their probabilities at each CoT step (for reading soft CoTs)."""
    share_prompt: bool = True
    """Prefill each distinct prompt of a batch once and copy its KV cache to the rows that share it (a group's G rows)."""

    def __post_init__(self):
        for name in ("max_cot_length", "max_answer_length", "num_generations", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.check_engine()
        if self.record_top_k < 0:
            raise UsageError(f"record_top_k must be >= 0, got {self.record_top_k}")
        if self.answer_temperature < 0:
            raise UsageError(f"answer_temperature must be >= 0 (0 = greedy), got {self.answer_temperature}")
        prompts.check_template(self.prompt_template)
        if not self.marker.strip():
            raise UsageError("marker must be non-empty text")


def field_docs(cls) -> dict[str, str]:
    """Field name -> its docstring, read from the class source (the single place options are described)."""
    import ast
    import inspect
    import textwrap

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if "__dataclass_fields__" in k.__dict__]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    assert set(docs) == {f.name for f in fields(cls)}, f"every field of {cls.__name__} needs a docstring"
    return docs


@dataclass
class DataOptions(PromptOptions):
    """What train and eval share about the data, the prompt and the reward."""

    question_key: str | None = None
    """Dataset column of the question (default: the first of question, problem, prompt). A column of chat messages ([{role, content}, ...]) is rendered with the tokenizer's chat template."""
    answer_key: str | None = None
    """Dataset column of the gold answer (default: the first of answer, final_answer, solution_answer)."""
    split: str | None = None
    """Split of a hub dataset (default: train for train, test for eval)."""
    dataset_config: str | None = None
    """Configuration (subset) of a hub dataset, e.g. 'main' for openai/gsm8k."""
    skip_bad: bool = False
    """Skip (and count) dataset rows without a usable question or answer instead of stopping at the first."""
    reward: str = ""
    """Your reward(s), 'package.module:function' or 'path/to/file.py:function' (several: comma-separated, or a YAML list), called as TRL calls one: f(prompts=, completions=, completion_ids=, trainer_state=, answers=, cot_modes=, **columns) -> list of floats or None, or (rewards, correct); empty = Math-Verify's 100 / 10 / 0."""
    reward_weights: list[float] | None = None
    """Weights of the rewards' sum, one per reward (default: 1 each), as TRL's reward_weights."""
    reward_timeout: float = 120.0
    """Seconds a user reward may take for one batch; past it the run stops with an error naming the reward."""

    default_split = "train"  # a class attribute, not an option: the split a hub dataset is read from by default

    def __post_init__(self):
        prompts.check_template(self.prompt_template)
        if self.split is None:
            self.split = self.default_split
        if isinstance(self.reward, (list, tuple)):  # the Python API's list of specs
            self.reward = ",".join(self.reward)
        if not self.reward_timeout > 0:
            raise UsageError(f"reward_timeout must be > 0 seconds, got {self.reward_timeout}")
        from softtokens.reward import check_weights, split_rewards

        check_weights(split_rewards(self.reward), self.reward_weights)

    def load_options(self, reward_fn=None) -> dict:
        """Keyword arguments of ``data.load_dataset`` for this run's data options (a custom reward may need no
        gold answer)."""
        return dict(question_key=self.question_key, answer_key=self.answer_key, skip_bad=self.skip_bad,
                    split=self.split, config=self.dataset_config, require_answer=not (self.reward or reward_fn))


@dataclass
class EvalConfig(DataOptions, EngineOptions):
    """An evaluation in the paper's six inference settings (METHOD.md §6)."""

    default_split = "test"

    datasets: str = "gsm8k,math500,olympiadbench"
    """Comma-separated built-in names, files (.jsonl / .csv / .parquet) or hub names."""
    settings: str = "all"
    """Comma-separated settings (hard_greedy, hard_sample, soft_greedy, soft_sample, fuzzy_greedy, fuzzy_sample) or 'all'."""
    num_samples: int = 32
    """Samples per problem in the sampled settings (greedy settings take one); pass@k for k <= this."""
    limit: int | None = None
    """Evaluate only the first N problems of each dataset."""
    max_cot_length: int = 512
    """CoT length limit L (the paper evaluates at 512)."""
    max_answer_length: int = 32
    """Answer tokens after the prefill (answers are always greedy in evaluation)."""
    batch_size: int = 64
    """Rows (problems x samples) decoded together."""
    seed: int = 0
    """Base seed of the sampled settings."""
    seeds: list[int] | None = None
    """Several evaluations, one per seed, each in out/seed-N (--seeds 0,1,2); overrides seed."""
    gamma: float = cot.DEFAULT_GAMMA
    """Noise scale of the soft/fuzzy sample settings: sigma = gamma * RMS(E), computed once per run."""
    grading_workers: int = 2
    """Worker processes that grade while the next batch generates (0 grades inline, in the main thread)."""
    grading_timeout: float = 5.0
    """Seconds Math-Verify may spend per parse or comparison; a stuck answer scores 0."""
    require_number: bool | None = None
    """Count a boxed answer as right only when it is a plain number (not an equal expression such as 20 + 10); unset: on for the built-in sums tasks, off for the rest (Math-Verify's equivalence, the paper's)."""
    save_cot_text: bool = True
    """Keep each sample's CoT text (the shadow text for soft/fuzzy) in the per-problem records."""
    out: str = "runs/eval"
    """Output folder: config.json, records/, results.json, results.md and plots."""
    resume: bool = False
    """Continue an interrupted evaluation in --out, skipping every problem already recorded."""

    def __post_init__(self):
        super().__post_init__()
        self.check_engine()
        for name in ("num_samples", "max_cot_length", "max_answer_length", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit must be >= 1, got {self.limit}")
        if not self.datasets.strip():
            raise UsageError("datasets must name at least one dataset")
        check_seeds(self.seeds)

    def rollout(self, samples: int) -> RolloutConfig:
        """The RolloutConfig of one setting: ``samples`` per problem, greedy answers."""
        return RolloutConfig(max_cot_length=self.max_cot_length, max_answer_length=self.max_answer_length,
                             answer_temperature=0.0, num_generations=samples, seed=self.seed, batch_size=self.batch_size,
                             **self.prompt_options(), **self.engine_options())


@dataclass
class OODConfig:
    """The out-of-domain check (METHOD.md §7): multiple-choice accuracy and answer NLL, against a base model."""

    base: str | None = None
    """The base model to compare against (same forms as --model)."""
    datasets: str = "hellaswag,arc_challenge,mmlu"
    """Comma-separated: hellaswag, arc_challenge, arc_easy, mmlu, or .jsonl files in that schema."""
    limit: int | None = None
    """Score only the first N items of each dataset."""
    batch_size: int = 32
    """Sequences (item x choice) per forward pass; items decoded together with --protocol generate."""
    protocol: str = "cloze"
    """cloze: rank the choices' texts by likelihood (lm-eval's acc, acc_norm) and the correct one's NLL; generate: lettered choices in the prompt, a greedy hard CoT and answer, graded by letter or text (the paper's Table 2 success rate)."""
    max_cot_length: int = 256
    """CoT length limit of --protocol generate."""
    out: str = "runs/ood"
    """Records, results and the chart go here."""
    resume: bool = False
    """Continue an interrupted check in --out."""

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"unknown protocol {self.protocol!r}: choose cloze or generate")
        if self.max_cot_length < 1:
            raise UsageError(f"max_cot_length must be >= 1, got {self.max_cot_length}")


REPORT_TO = ("tensorboard", "wandb", "none")

# TrainConfig fields a resumed run may change: the schedule's length, intervals, memory and process knobs.
# Any other change is a different run and --resume refuses it.
RESUMABLE = ("max_steps", "eval_steps", "save_steps", "logging_steps", "grading_workers", "micro_batch_size",
             "rollout_batch_size", "gradient_checkpointing", "share_prompt", "skip_zero_advantage",
             "device", "report_to", "push_to_hub", "save_strategy", "output_dir",
             "resume", "resume_from_previous", "allow_unverified", "reward_timeout", "run_name", "log_completions",
             "engine", "cuda_graphs", "compile_decoder", "attention_kernel")


@dataclass
class TrainConfig(DataOptions, EngineOptions):
    """An RL run (METHOD.md §5). The defaults are the paper's; YAML files under configs/ set the rest."""

    model: str = "smollm2"
    """HF directory, hub id, .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct)."""
    dataset: str = "gsm8k_train"
    """Training problems: a built-in name, a file, or a hub name (deepscaler)."""
    val_size: int = 100
    """[choice] Problems held out from the end of the training set for greedy validation."""
    mode: str = "soft"
    """CoT mode: hard, soft or fuzzy."""
    temperature: float | None = None
    """CoT temperature; default per mode (hard 1.0, soft 0.5, fuzzy 0.0001)."""
    gamma: float = cot.DEFAULT_GAMMA
    """Noise scale: sigma = gamma * RMS of what the noise is added to (E by default), computed once from the initial model and kept for the run."""
    noise_on: str = "embedding"
    """Where the CoT noise goes: embedding (the paper), hidden, logits or topk_logits (METHOD.md §10; HF engine only but for embedding)."""
    top_k: int = 5
    """Logits kept by noise_on topk_logits."""
    prompts_per_step: int = 2
    """B: prompts per optimiser step."""
    num_generations: int = 32
    """G: rollouts per prompt (the RLOO group)."""
    max_cot_length: int = 128
    """CoT length limit L (128 for GSM8K, 512 for MATH and DeepScaleR)."""
    max_answer_length: int = 32
    """Answer tokens after the prefill."""
    answer_temperature: float = 1.0
    """Sampling temperature of the answer during training."""
    estimator: str = "rloo"
    """Advantage estimator: rloo (the paper) or grpo (std-normalised groups)."""
    beta: float = 0.0
    """KL penalty to a frozen copy of the initial model (k3 estimator); 0 = none, and no reference is loaded."""
    rollout_correction: str = "none"
    """Correct the rollout-scorer mismatch: none (the paper) or tis (truncated importance sampling: each rollout's loss weighted by min(exp(l_scored - l_rollout), tis_cap))."""
    tis_cap: float = 2.0
    """The cap C of truncated importance sampling's ratio (rollout_correction: tis)."""
    learning_rate: float = 6e-6
    """AdamW peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    max_steps: int = 4000
    """Optimiser steps (one per batch of B x G rollouts, on-policy)."""
    adam_beta1: float = 0.9
    """[choice] AdamW beta1."""
    adam_beta2: float = 0.999
    """[choice] AdamW beta2."""
    weight_decay: float = 0.0
    """[choice] AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """[choice] Gradient clipping norm; None = no clipping."""
    micro_batch_size: int = 8
    """Rollouts scored per backward pass (gradient accumulation over the B x G rollouts)."""
    rollout_batch_size: int = 64
    """Rows decoded together during rollouts."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (large models)."""
    disable_dropout: bool = True
    """Set every dropout of the model (and of LoRA) to 0, as TRL does: scoring runs in train mode, and dropout there would score another policy than the one that sampled."""
    skip_zero_advantage: bool = True
    """Do not score rollouts whose advantage is 0 when no KL term needs them (they add nothing to the loss or its gradient); logged as train/rows_skipped."""
    share_prompt: bool = True
    """Compute each group's prompt once: one prefill copied to its G rollouts, and in scoring one pass over the prompt that its G continuations attend to (equal results; false repeats the prompt per row, for comparison)."""
    dtype: str = "auto"
    """Compute dtype: float32, bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)."""
    mixed_precision: bool = True
    """[choice] With a bfloat16 dtype, keep float32 master weights and AdamW state (FSDP2 mixed precision); false trains bfloat16 weights directly (half the memory; small updates round away)."""
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
    device: str = "auto"
    """cpu, cuda, cuda:N (auto: cuda when available)."""
    seed: int = 0
    """Seeds the problem order and every rollout."""
    seeds: list[int] | None = None
    """Several runs, one per seed, each in output_dir/seed-N (--seeds 0,1,2); overrides seed. report gives their mean +- std."""
    eval_steps: int = 100
    """Greedy validation every N steps (and at the end); the best checkpoint is kept; 0 = never."""
    save_steps: int = 100
    """Checkpoint every N steps (and always at the end and on SIGINT / SIGTERM); 0 = only then."""
    save_strategy: str = "steps"
    """steps: checkpoints as save_steps says; no: none at all, not even the best or the last (a run that cannot resume; benchmarks)."""
    logging_steps: int = 1
    """Log metrics every N steps."""
    grading_workers: int = 1
    """Grading worker processes (0 = grade in the main thread)."""
    require_number: bool | None = None
    """[choice] Count a boxed answer as right only when it is a plain number: Math-Verify alone also accepts an equal expression such as 20 + 10, which a policy can learn to copy from the question. Unset: on when the training and held-out sets are the built-in sums tasks, off for the rest (the paper's grading)."""
    eval_before_after: int = 0
    """Evaluate the first N problems of eval_dataset (greedy CoT in eval_mode, greedy answer) before and after training, with 95% intervals; 0 = skip."""
    eval_dataset: str = "gsm8k"
    """The held-out set of the before / after check (sums_test for the demo)."""
    eval_mode: str = "hard"
    """CoT mode of the before / after check, greedy: hard is the trained model deployed as a plain checkpoint."""
    ood_limit: int = 0
    """Score the first N items of HellaSwag, ARC-Challenge and MMLU before and after training and print the change; 0 = skip."""
    report_to: str = "tensorboard"
    """Where metrics go besides metrics.jsonl: tensorboard, wandb (pip install wandb) or none."""
    run_name: str = ""
    """W&B run name (default: the output folder's name, 'hard/seed-0' for a seed folder); the project is $WANDB_PROJECT, else softtokens."""
    log_completions: int = 0
    """Write the first N rollouts of each step (prompt, CoT text, answer, each reward, advantage) to completions.jsonl and a TensorBoard text panel (a W&B table); 0 = none."""
    push_to_hub: str = ""
    """A Hugging Face hub repo id ('user/name'): upload checkpoint-best (else the last checkpoint) at the end."""
    output_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl, TensorBoard events and the resolved config."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir (its config must match, but for RESUMABLE fields)."""
    resume_from_previous: bool = False
    """With --resume: when the last checkpoint fails its SHA-256 check, resume from the one before it."""
    allow_unverified: bool = False
    """With --resume: accept a checkpoint that has no checksums.json (one written before softtokens kept it)."""

    def __post_init__(self):
        super().__post_init__()
        self.check_engine()
        if self.mode not in cot.MODES:
            raise UsageError(f"unknown CoT mode {self.mode!r}: choose one of {', '.join(cot.MODES)}")
        for name in ("prompts_per_step", "num_generations", "max_cot_length", "max_answer_length", "max_steps",
                     "micro_batch_size", "rollout_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_steps", "save_steps", "val_size", "beta", "eval_before_after", "ood_limit",
                     "log_completions"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UsageError(f"max_grad_norm must be > 0, or null for no clipping, got {self.max_grad_norm}")
        if self.rollout_correction not in CORRECTIONS:
            raise UsageError(f"unknown rollout_correction {self.rollout_correction!r}: choose none or tis")
        if not self.tis_cap >= 1:
            raise UsageError(f"tis_cap must be >= 1 (a ratio of 1 is an unchanged rollout), got {self.tis_cap}")
        check_noise_on(self.mode, self.noise_on, self.top_k)
        self.cot()  # the CoT's temperature and gamma, checked now rather than after the model loads
        if self.answer_temperature < 0:
            raise UsageError(f"answer_temperature must be >= 0 (0 = greedy), got {self.answer_temperature}")
        check_seeds(self.seeds)
        if self.eval_mode not in cot.MODES:
            raise UsageError(f"unknown eval_mode {self.eval_mode!r}: choose one of {', '.join(cot.MODES)}")
        if self.estimator not in ("rloo", "grpo"):
            raise UsageError(f"unknown estimator {self.estimator!r}: choose rloo or grpo")
        if self.estimator == "rloo" and self.num_generations < 2:
            raise UsageError("rloo needs num_generations >= 2")
        if self.use_peft and self.lora_r < 1:
            raise UsageError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.learning_rate > 0:
            raise UsageError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.save_strategy not in ("steps", "no"):
            raise UsageError(f"unknown save_strategy {self.save_strategy!r}: choose steps or no")
        if self.save_strategy == "no" and self.push_to_hub:
            raise UsageError("push_to_hub needs a checkpoint to push: save_strategy must be steps")
        if self.report_to not in REPORT_TO:
            raise UsageError(f"unknown report_to {self.report_to!r}: choose one of {', '.join(REPORT_TO)}")

    def cot(self) -> CoTConfig:
        return CoTConfig(self.mode, self.temperature, self.gamma, noise_on=self.noise_on, top_k=self.top_k)

    def rollout(self, seed: int, generations: int, answer_temperature: float) -> RolloutConfig:
        """The RolloutConfig of a training step (seed per step) or of a greedy check (one generation)."""
        return RolloutConfig(max_cot_length=self.max_cot_length, max_answer_length=self.max_answer_length,
                             answer_temperature=answer_temperature, num_generations=generations, seed=seed,
                             batch_size=self.rollout_batch_size, share_prompt=self.share_prompt,
                             **self.prompt_options(), **self.engine_options())


def config_from_dict(cls, values: dict, source: str = "config"):
    """A config from a mapping (a YAML file, overrides), naming any unknown key or wrong type."""
    import typing

    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        near = {k: difflib.get_close_matches(k, known, n=1, cutoff=0.6) for k in unknown}
        suggest = "; ".join(f"{k}: did you mean {m[0]}?" for k, m in near.items() if m)
        raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}" + (f" ({suggest})" if suggest else "")
                         + f"; valid keys: {', '.join(sorted(known))}")
    out = {}
    for key, value in values.items():
        kinds = [a for a in typing.get_args(hints[key]) if a is not type(None)] or [hints[key]]
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
            out[key] = ",".join(value)  # reward: [a.py:f, b.py:g]
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


# TrainConfig's options by concern, for docs/CONFIG.md (a test keeps every field in exactly one section).
TRAIN_SECTIONS = {
    "Model and precision": ("model", "dtype", "mixed_precision", "device", "use_peft", "lora_r", "lora_alpha",
                            "lora_dropout", "lora_target_modules", "disable_dropout", "gradient_checkpointing"),
    "Data, prompt and reward": ("dataset", "val_size", "question_key", "answer_key", "split", "dataset_config",
                                "skip_bad", "prompt_template", "chat_template", "reward", "reward_weights",
                                "reward_timeout", "require_number", "grading_workers"),
    "CoT": ("mode", "temperature", "gamma", "noise_on", "top_k"),
    "Rollout and engine": ("prompts_per_step", "num_generations", "max_cot_length", "max_answer_length",
                           "answer_temperature", "rollout_batch_size", "share_prompt", "seed", "seeds", "engine",
                           "cuda_graphs", "compile_decoder", "attention_kernel"),
    "Optimisation and schedule": ("estimator", "beta", "rollout_correction", "tis_cap", "learning_rate",
                                  "warmup_steps", "max_steps", "adam_beta1", "adam_beta2", "weight_decay",
                                  "max_grad_norm", "micro_batch_size", "skip_zero_advantage"),
    "Checkpoints and resume": ("output_dir", "save_steps", "save_strategy", "push_to_hub", "resume",
                               "resume_from_previous", "allow_unverified"),
    "Logging": ("logging_steps", "report_to", "run_name", "log_completions"),
    "Evaluation during training": ("eval_steps", "eval_before_after", "eval_dataset", "eval_mode", "ood_limit"),
}


def options_markdown() -> str:
    """docs/CONFIG.md: every option of every command, with its default and its description (the field's docstring)."""
    import dataclasses

    def table(cls, names) -> list[str]:
        docs, defaults = field_docs(cls), {f.name: f.default for f in dataclasses.fields(cls)}
        return ["| option | default | what it does |", "|---|---|---|"] + [
            f"| `{n}` | `{defaults[n]!r}` | {docs[n].replace('|', '/')} |" for n in names]

    out = ["# Options", "",
           "Every option, its default and what it does; generated from the config classes' docstrings "
           "(`python -m softtokens.config > docs/CONFIG.md`; a test keeps this file current). In YAML an option is "
           "a key (`learning_rate: 1e-5`), on the command line a flag (`--learning-rate 1e-5`, or "
           "`--learning_rate`).", "", "## train (`TrainConfig`)", ""]
    for section, names in TRAIN_SECTIONS.items():
        out += [f"### {section}", "", *table(TrainConfig, names), ""]
    for title, cls in (("eval (`EvalConfig`)", EvalConfig), ("ood (`OODConfig`)", OODConfig),
                       ("generate: the CoT (`CoTConfig`)", CoTConfig),
                       ("generate: the rollout and the engine (`RolloutConfig`)", RolloutConfig)):
        out += [f"## {title}", "", *table(cls, [f.name for f in fields(cls)]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(options_markdown(), end="")
