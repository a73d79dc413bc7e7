"""The method's named choices and their paper defaults (METHOD.md §2, §5, §10), without torch.

The configs check option values against these when they are built, and the CLI parses and checks every flag
before it imports torch; ``cot.py`` and ``estimators.py`` hold the maths and take the names from here.
"""

from typing import Literal, get_args

# Each choice is a Literal type, which the config field is annotated with, and the tuple of its values that the
# config checks against: one list of names.
Mode = Literal["hard", "soft", "fuzzy"]
MODES: tuple[str, ...] = get_args(Mode)

# METHOD.md §2: the CoT temperature each mode trains (and samples) at.
DEFAULT_TEMPERATURE = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}

# METHOD.md §2: sigma = gamma * RMS(E), gamma = 0.33.
DEFAULT_GAMMA = 0.33

# METHOD.md §10: where a soft / fuzzy CoT step's Gaussian noise goes. The paper's default is the input embedding;
# the others are its Table 7 ablation.
NoiseOn = Literal["embedding", "hidden", "logits", "topk_logits"]
NOISE_ON: tuple[str, ...] = get_args(NoiseOn)

# METHOD.md §5: advantage estimators (rloo is the paper's) and rollout-scorer mismatch corrections.
Estimator = Literal["rloo", "grpo"]
ESTIMATOR_NAMES: tuple[str, ...] = get_args(Estimator)  # estimators.ESTIMATORS holds the functions
Correction = Literal["none", "tis"]
CORRECTIONS: tuple[str, ...] = get_args(Correction)
