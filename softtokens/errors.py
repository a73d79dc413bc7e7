"""The error that bad input causes: the command line prints its message on one line and exits 2.

Any other exception (a bug, a library's failure) keeps its traceback, so that it can be reported.
"""


class UsageError(ValueError):
    """Bad input (a config value, a file, a reward), named with its fix. A ValueError, so callers of the
    Python API may catch either."""
