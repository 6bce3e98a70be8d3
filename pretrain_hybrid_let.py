"""Hybrid-model pretraining with Late-to-Early Training: a drop-in for Megatron-LM's pretrain_hybrid.py.

    torchrun pretrain_hybrid_let.py <your Megatron-LM flags> --hybrid-layer-pattern '*-*-*-*-' \\
        --let-teacher DIR --let-target-layer K

Runs Megatron-LM's own ``pretrain()`` with a ``HybridModel`` (megatron-core 0.19+), through the same LET
wiring as pretrain_gpt_let.py: the user's ``pretrain_hybrid.py`` when MEGATRON_LM_PATH names a checkout, else
the wheel's ``megatron.training`` with megatron_let's GPT-like training functions. ``--let-target-layer K``
counts the symbols of ``--hybrid-layer-pattern`` (1-based, ``|`` not counted): after GPT block k on a ``*-``
pattern is K = 2k. ``--transformer-impl local`` builds the pattern from megatron-core's own modules
(``*``, ``-``, ``E``; what runs on CPU). See docs/hybrid.md.
"""

import sys

from pretrain_gpt_let import main

if __name__ == "__main__":
    sys.exit(main(model="hybrid"))
