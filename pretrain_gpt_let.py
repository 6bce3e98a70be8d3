"""GPT pretraining with Late-to-Early Training: a drop-in for Megatron-LM's pretrain_gpt.py.

    torchrun pretrain_gpt_let.py <your Megatron-LM flags> --let-teacher DIR --let-target-layer K

With Megatron-LM importable (``megatron.training``; a checkout in MEGATRON_LM_PATH, put first on
sys.path so its own megatron.core is used, or on PYTHONPATH) this runs Megatron-LM's own
``pretrain()``, or stops with one line saying why it cannot; without Megatron-LM, a lean trainer
built from megatron-core parts that accepts Megatron-LM's names for the flags it implements and
refuses every other flag. The first line of the output names the trainer and where megatron.core
and megatron.training come from.
"""

import os
import sys


def main(argv=None) -> int:
    # Before anything imports megatron: MEGATRON_LM_PATH goes first on sys.path (so megatron.core is the
    # checkout's), and a Megatron-LM that was asked for but cannot run is one line, never a silent fallback.
    from megatron_let.integrations.selection import TrainerSelectionError, announce, choose_trainer

    try:
        choice = choose_trainer()
    except TrainerSelectionError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_gpt_let.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    announce(choice)
    if choice.megatron_lm:
        from megatron_let.integrations.megatron_lm import main as megatron_lm_main

        return megatron_lm_main() or 0
    from megatron_let.training.cli import main as lean_main

    return lean_main(argv)


if __name__ == "__main__":
    sys.exit(main())
