"""Running megatron-core (``cpu``) and Megatron-LM (``cpu_megatron_lm``) on a machine without CUDA.

Redirections of hard-coded CUDA calls, active only when CUDA is absent, declared as entries of
:mod:`megatron_let.patch_registry` (their version ranges are data). Only launchers (``pretrain_gpt_let.py``, the
lean trainer's CLI, the Megatron-LM driver), benchmarks and tests import this package; LET's logic never
depends on it.
"""
