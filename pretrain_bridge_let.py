"""Megatron-Bridge pretraining with Late-to-Early Training: any recipe, Bridge's own overrides, LET as ``let.*``.

    torchrun --nproc-per-node=8 pretrain_bridge_let.py --recipe megatron.bridge.recipes.gpt.vanilla_gpt:vanilla_gpt_pretrain_config \\
        let.teacher=/models/smollm2-135m let.target_layer=4 train.train_iters=1000 [more Hydra-style overrides]

``--recipe module:function`` names a function returning a Bridge ``ConfigContainer``; ``--config-file`` merges a
YAML first; ``--forward-step module:function`` picks the step (Bridge's GPT ``forward_step`` by default). Every
other argument is a Hydra-style override of the container (Bridge's ``process_config_with_overrides``), the
``let`` section included; without ``let.teacher`` it is Bridge's own run. On a machine without CUDA, Bridge and
megatron-core are redirected to the CPU (megatron_let/compat/cpu_bridge.py; gloo: ``dist.distributed_backend=gloo``).
"""

import argparse
import importlib
import sys

import torch


def _load(spec: str, what: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"pretrain_bridge_let.py: error: {what} must be module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain_bridge_let.py", allow_abbrev=False,
        usage="torchrun pretrain_bridge_let.py --recipe module:function [let.teacher=DIR let.target_layer=K] "
              "[key=value overrides ...]",
        description="Megatron-Bridge pretrain() of a recipe with LET's let.* settings (megatron_let.integrations.bridge).")
    parser.add_argument("--recipe", required=True, help="module:function returning a Bridge ConfigContainer")
    parser.add_argument("--config-file", help="a YAML merged into the recipe before the overrides")
    parser.add_argument("--forward-step", help="module:function (default: megatron.bridge.training.gpt_step:forward_step)")
    parser.add_argument("overrides", nargs="*", help="Hydra-style overrides: train.train_iters=100 let.teacher=DIR ...")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        from megatron_let.compat.cpu_bridge import enable_cpu_bridge

        enable_cpu_bridge()  # before anything imports megatron.bridge
    from megatron.bridge.training.pretrain import pretrain
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    from megatron_let.errors import LETConfigError, LETNonFiniteError, print_error
    from megatron_let.integrations.bridge import bridge_names, let_forward_step_and_callbacks, with_let
    from megatron_let.patch_registry import announce

    program = "pretrain_bridge_let.py"
    cfg = with_let(_load(args.recipe, "--recipe")())
    cfg = process_config_with_overrides(cfg, config_filepath=args.config_file, cli_overrides=args.overrides)
    forward_step = _load(args.forward_step, "--forward-step") if args.forward_step else None
    try:
        step, callbacks = let_forward_step_and_callbacks(cfg, forward_step)
        announce()
        pretrain(cfg, step, callbacks=callbacks)
    except (LETConfigError, LETNonFiniteError) as error:
        print_error(program, bridge_names(str(error)))
        return 2 if isinstance(error, LETConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
