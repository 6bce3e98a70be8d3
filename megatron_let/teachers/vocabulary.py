"""The teacher must read the same token ids as the target: check before any training step."""

from typing import Optional

from megatron_let.config import LETConfigError
from megatron_let.teachers.huggingface import resolve_teacher

SAMPLE_TOKENS = 64


def _sample_ids(vocab_size: int, count: int = SAMPLE_TOKENS):
    step = max(1, vocab_size // count)
    return sorted(set(range(0, vocab_size, step)) | {vocab_size - 1})


def check_vocabulary(teacher_path: str, target_vocab_size: int, target_tokenizer=None,
                     target_name: str = "the target's tokenizer", warn=None) -> None:
    """Raise LETConfigError when the teacher would see different tokens than the target.

    ``target_vocab_size`` is the tokenizer's true size, before the padding
    Megatron adds for TP (``--make-vocab-size-divisible-by``), so padding never
    counts as a mismatch. With both tokenizers at hand, their sizes and a
    spread-out sample of token strings must agree; without the target's
    tokenizer (mock data) every target id must at least exist in the teacher. A teacher
    directory without tokenizer files cannot be compared token by token: ``warn`` says so
    (it runs: a converted teacher often ships none, and the same tokenizer is the usual case).
    """
    source = resolve_teacher(teacher_path)
    teacher_embeddings = source.config().vocab_size
    fix = ("LET needs the target trained with the teacher's tokenizer: pass --tokenizer-model pointing at the "
           "teacher's tokenizer (or choose a teacher with this tokenizer).")
    if target_vocab_size > teacher_embeddings:
        raise LETConfigError(f"--let-teacher {teacher_path!r} has {teacher_embeddings} token embeddings but "
                             f"{target_name} has {target_vocab_size} tokens. {fix}")
    teacher_tokenizer = source.tokenizer() if target_tokenizer is not None else None
    if target_tokenizer is not None and teacher_tokenizer is None and warn is not None:
        warn(f"--let-teacher {teacher_path!r} ships no tokenizer (no tokenizer.json / tokenizer_config.json "
             f"it can load): only its size ({teacher_embeddings} token embeddings) was checked against {target_name}, "
             "not its tokens; copy the teacher's tokenizer files next to its config.json to have them compared.")
    if target_tokenizer is None or teacher_tokenizer is None:
        return
    teacher_size = len(teacher_tokenizer)
    if teacher_size != target_vocab_size:
        raise LETConfigError(f"--let-teacher {teacher_path!r}: its tokenizer has {teacher_size} tokens, "
                             f"{target_name} has {target_vocab_size}. {fix}")
    ids = _sample_ids(target_vocab_size)
    ours = target_tokenizer.convert_ids_to_tokens(ids)
    theirs = teacher_tokenizer.convert_ids_to_tokens(ids)
    for token_id, a, b in zip(ids, ours, theirs):
        if a != b:
            raise LETConfigError(f"--let-teacher {teacher_path!r}: token {token_id} is {b!r} for the teacher but "
                                 f"{a!r} for {target_name}. {fix}")


def hf_tokenizer_of(tokenizer) -> Optional[object]:
    """The Hugging Face tokenizer inside a Megatron tokenizer wrapper, if there is one."""
    for attr in ("tokenizer", "_tokenizer"):
        inner = getattr(tokenizer, attr, None)
        if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
            return inner
        if inner is not None:
            deeper = getattr(inner, "tokenizer", None)
            if deeper is not None and hasattr(deeper, "convert_ids_to_tokens"):
                return deeper
    return None
