"""megatron-let: Late-to-Early Training (LET) for Megatron-Core GPT pretraining."""

from megatron_let.config import LETConfig, LETConfigError, add_let_args, let_config_from_args
from megatron_let.controller import LateToEarlyTraining

__all__ = ["LETConfig", "LETConfigError", "LateToEarlyTraining", "add_let_args", "let_config_from_args"]
__version__ = "0.1.0"
