"""Megatron-Bridge's own run, untouched by LET: a recipe, Bridge's Hydra-style overrides, Bridge's GPT forward
step and ``pretrain()``; only the CPU redirections (megatron_let/compat/cpu_bridge.py) where there is no CUDA.

    torchrun bridge_plain.py module:function [key=value ...]

tests/test_bridge.py compares pretrain_bridge_let.py without ``let.*`` against it.
"""

import importlib
import sys

import torch

if __name__ == "__main__":
    if not torch.cuda.is_available():
        from megatron_let.compat.cpu_bridge import enable_cpu_bridge

        enable_cpu_bridge()
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    module, _, function = sys.argv[1].partition(":")
    cfg = getattr(importlib.import_module(module), function)()
    pretrain(process_config_with_overrides(cfg, cli_overrides=sys.argv[2:]), forward_step)
