"""softtokens: RL of language models with hard, soft and fuzzy chain-of-thought tokens.

The method is "Soft Tokens, Hard Truths" (Butt et al., arXiv 2509.19170); see README.md for the commands
and the Python API, and the module docstrings for where each piece lives.

    from softtokens import TrainConfig, train
    train(TrainConfig(mode="soft", dataset="gsm8k_train", reward_weights=[1.0, 0.5]), reward_fn=[right, short])

``evaluate_model(EvalConfig(...))`` loads a model and evaluates it (``softtokens.evaluate`` is the module). The
names below load on first use, so that ``import softtokens`` (and the command line's --help) stays free of
torch.
"""

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "TrainConfig": "softtokens.config", "EvalConfig": "softtokens.config", "OODConfig": "softtokens.config",
    "GenerateConfig": "softtokens.config", "train": "softtokens.trainer", "evaluate_model": "softtokens.evaluate",
    "load_model": "softtokens.models", "ood_eval": "softtokens.ood", "UsageError": "softtokens.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softtokens' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
