"""The method's named choices and their paper defaults (METHOD.md §2, §5, §10), without torch.

The configs check option values against these when they are built, and the CLI parses and checks every flag
before it imports torch; ``cot.py`` and ``estimators.py`` hold the maths and take the names from here.
"""

MODES = ("hard", "soft", "fuzzy")

# METHOD.md §2: the CoT temperature each mode trains (and samples) at.
DEFAULT_TEMPERATURE = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}

# METHOD.md §2: sigma = gamma * RMS(E), gamma = 0.33.
DEFAULT_GAMMA = 0.33

# METHOD.md §10: where a soft / fuzzy CoT step's Gaussian noise goes. The paper's default is the input embedding;
# the others are its Table 7 ablation.
NOISE_ON = ("embedding", "hidden", "logits", "topk_logits")

# METHOD.md §5: advantage estimators (rloo is the paper's) and rollout-scorer mismatch corrections.
ESTIMATOR_NAMES = ("rloo", "grpo")  # estimators.ESTIMATORS holds the functions
CORRECTIONS = ("none", "tis")
