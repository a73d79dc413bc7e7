"""softtokens: RL of language models with hard, soft and fuzzy chain-of-thought tokens.

The method is "Soft Tokens, Hard Truths" (Butt et al., arXiv 2509.19170); see README.md for the commands
and the Python API, and the module docstrings for where each piece lives.
"""

__version__ = "0.1.0"
