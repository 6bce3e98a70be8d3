"""GPT pretraining with Late-to-Early Training: a drop-in for Megatron-LM's pretrain_gpt.py.

    torchrun pretrain_gpt_let.py <your Megatron-LM flags> --let-teacher DIR --let-target-layer K

With Megatron-LM importable (``megatron.training``; a checkout on PYTHONPATH or
in MEGATRON_LM_PATH) this runs Megatron-LM's own ``pretrain()``; otherwise a
lean trainer built from megatron-core parts that accepts Megatron-LM's names
for the flags it implements and refuses every other flag.
"""

import importlib.util
import os
import sys


def _megatron_lm_available() -> bool:
    path = os.environ.get("MEGATRON_LM_PATH")
    if path and path not in sys.path:
        sys.path.append(path)  # append: megatron.core keeps coming from the installed wheel
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.training") is None:
        return False  # cheap answer first: the lean trainer's bad-flag errors stay instant
    from megatron_let.integrations.megatron_lm import megatron_lm_available  # applies the CPU redirections it needs

    return megatron_lm_available()


def main(argv=None) -> int:
    if _megatron_lm_available():
        from megatron_let.integrations.megatron_lm import main as megatron_lm_main

        return megatron_lm_main() or 0
    from megatron_let.training.cli import main as lean_main

    return lean_main(argv)


if __name__ == "__main__":
    sys.exit(main())
