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

# megatron.core's import-time UserWarnings when TransformerEngine/Apex are absent (4-6 per process)
CPU_FALLBACK_WARNINGS = r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back to"


def quiet_cpu_fallback_warnings() -> str:
    """Without a GPU, TransformerEngine and Apex are expected to be missing: silence megatron.core's warnings
    about them (only those) before it is imported, and return the note for the start-up line ("" on a GPU
    machine, where the warnings stay). Decided without importing torch, so flag errors stay instant."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = visible not in ("", "-1") and any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))
    if gpu:
        return ""
    import warnings

    warnings.filterwarnings("ignore", message=CPU_FALLBACK_WARNINGS, category=UserWarning)
    return " | no GPU: TransformerEngine/Apex not used (torch fallbacks, as expected on CPU)"


def main(argv=None, model: str = "gpt") -> int:
    """``model="hybrid"``: pretrain_hybrid_let.py (a HybridModel from --hybrid-layer-pattern)."""
    program = "pretrain_hybrid_let.py" if model == "hybrid" else "pretrain_gpt_let.py"
    # Before anything imports megatron: MEGATRON_LM_PATH goes first on sys.path (so megatron.core is the
    # checkout's), and a Megatron-LM that was asked for but cannot run is one line, never a silent fallback.
    cpu_note = quiet_cpu_fallback_warnings()
    from megatron_let.errors import print_error
    from megatron_let.integrations.selection import TrainerSelectionError, choose_trainer

    try:
        choice = choose_trainer()
    except TrainerSelectionError as error:
        print_error(program, error)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # the start-up line, once
        print(choice.describe() + cpu_note, flush=True)
        if choice.warning():
            print(choice.warning(), flush=True)
    if choice.megatron_lm:
        from megatron_let.integrations.megatron_lm import main as megatron_lm_main

        return megatron_lm_main(model=model) or 0
    if model == "hybrid":  # the lean trainer builds GPTModels only
        from megatron_let.integrations.megatron_lm import LETMegatronLM, help_requested, print_let_help

        if help_requested():  # the flags it adds under Megatron-LM (the provider uses no instance state)
            print_let_help(LETMegatronLM.extra_args_provider(None), "this stack has no Megatron-LM pretrain(), which "
                           "pretrain_hybrid_let.py runs under, so its flags are not listed: install megatron-core 0.19 "
                           "(Python 3.12), or set MEGATRON_LM_PATH to a Megatron-LM 0.19 checkout.")
            return 0
        print_error(program, "HybridModel runs under Megatron-LM's pretrain() only, which this stack lacks "
                    "(megatron.training ships with megatron-core 0.17+, Python 3.12): install megatron-core 0.19, or "
                    "set MEGATRON_LM_PATH to a Megatron-LM 0.19 checkout.")
        return 2
    from megatron_let.training.cli import main as lean_main

    return lean_main(argv)


if __name__ == "__main__":
    sys.exit(main())
