"""megatron-let: Late-to-Early Training (LET) for Megatron-Core GPT pretraining.

Importing the package is cheap (flags, config, errors); the parts that need
megatron-core load on first use, so a bad command line fails in a second.
"""

from megatron_let.config import LETConfig, add_let_args, let_config_from_args
from megatron_let.errors import LETConfigError, LETNonFiniteError

__all__ = ["LETConfig", "LETConfigError", "LETNonFiniteError", "LateToEarlyTraining", "add_let_args",
           "let_config_from_args"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LateToEarlyTraining":
        from megatron_let.controller import LateToEarlyTraining

        return LateToEarlyTraining
    raise AttributeError(f"module 'megatron_let' has no attribute {name!r}")
