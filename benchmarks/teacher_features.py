"""How a teacher's final-layer (or --teacher-layer) states are shaped, before choosing --let-teacher-norm.

    python benchmarks/teacher_features.py --teacher DIR --data-prefix PREFIX --tokenizer DIR [--sequences 64]
        [--teacher-layer I]

Reads ``--sequences`` random documents of a Megatron indexed dataset (PREFIX.bin/.idx, e.g. what
``python examples/experiments/corpus.py`` writes), turns them back into text with the dataset's
tokenizer, re-tokenizes the text with the teacher's own tokenizer, cuts windows of ``--seq-length``
teacher tokens and reports, over every token of them:
- the start-up line of LET (``feature_energy_report``): energy in the top 1 / 16 dimensions and in the mean state;
- the mean cosine between two tokens' states, raw and centred (what a constant output already scores);
- the share of the centred variance in the top 16 / 64 / 256 principal directions (how many directions
  a target would have to match);
- when the teacher's tokenizer is not the dataset's: how --let-token-alignment causal-span lines them up
  (teacher tokens per target token, and the share of target positions whose teacher token ends exactly
  where theirs does; the others get the state of an earlier teacher token).
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_let.loss.teacher_norm import feature_energy_report  # noqa: E402
from megatron_let.teachers.huggingface import HFTeacher  # noqa: E402


def teacher_windows(args, dataset, data_tokenizer, teacher_tokenizer) -> torch.Tensor:
    """[n, seq] teacher token ids from random documents of the dataset, as text."""
    rng = random.Random(args.seed)
    ids, need = [], args.sequences * args.seq_length
    for index in rng.sample(range(len(dataset)), len(dataset)):
        ids += teacher_tokenizer(data_tokenizer.decode(dataset[index].tolist()) + "\n").input_ids
        if len(ids) >= need:
            break
    if len(ids) < need:
        sys.exit(f"--data-prefix {args.data_prefix}: only {len(ids)} teacher tokens; lower --sequences")
    return torch.tensor(ids[:need]).view(args.sequences, args.seq_length)


def causal_span_line(args, dataset, data_tokenizer) -> str:
    """Causal-span alignment of the dataset's first sequences (as the target reads them) to the teacher's
    tokenizer."""
    from megatron_let.teachers.token_alignment import build_aligner

    aligner = build_aligner(data_tokenizer, args.teacher, data_tokenizer.eos_token_id or 0, None)
    if aligner.identity:
        return "same vocabulary as the dataset: causal-span is the identity"
    ids = torch.cat([torch.from_numpy(dataset[i].astype("int64")) for i in range(min(len(dataset), 400))])
    rows = [row.numpy() for row in ids[:args.sequences * args.seq_length].view(-1, args.seq_length)]
    exact = positions = teacher_tokens = 0
    for row in aligner.align_rows(rows):
        valid = row["valid"]
        exact += int((row["teacher_ends"][row["index"]][valid] == row["target_ends"][valid]).sum())
        positions += int(valid.sum())
        teacher_tokens += len(row["teacher_ids"])
    return (f"causal-span: {teacher_tokens / len(rows):.0f} teacher tokens per {args.seq_length} target tokens; "
            f"{100 * exact / positions:.1f}% of target positions get a teacher token ending where theirs ends")


def mean_pairwise_cosine(states: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows, from the sum of unit vectors (no n x n matrix)."""
    unit = torch.nn.functional.normalize(states, dim=-1)
    total, n = unit.sum(0), unit.shape[0]
    return float((total @ total - n) / (n * (n - 1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="Hugging Face model directory or .gguf (as --let-teacher)")
    parser.add_argument("--data-prefix", required=True, help="Megatron indexed dataset prefix (no .bin/.idx)")
    parser.add_argument("--tokenizer", required=True, help="the dataset's Hugging Face tokenizer directory")
    parser.add_argument("--teacher-layer", type=int, default=None, help="as --let-teacher-layer (default: final)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    dataset, data_tokenizer = IndexedDataset(args.data_prefix), AutoTokenizer.from_pretrained(args.tokenizer)
    teacher = HFTeacher(args.teacher, device=torch.device("cpu"), layer=args.teacher_layer)
    windows = teacher_windows(args, dataset, data_tokenizer, AutoTokenizer.from_pretrained(args.teacher))
    states = torch.cat([teacher.hidden_states(chunk) for chunk in windows.split(8)], dim=1)  # [s, n, h]
    flat = states.reshape(-1, states.shape[-1]).double()
    centred = flat - flat.mean(0)
    variances = torch.linalg.eigvalsh(centred.T @ centred / flat.shape[0]).flip(0).clamp(min=0)
    tops = [k for k in (16, 64, 256) if k < variances.numel()]
    shares = " / ".join(f"{100 * variances[:k].sum() / variances.sum():.0f}%" for k in tops)
    layer = "final layer" if args.teacher_layer is None else f"layer {args.teacher_layer}"
    print(f"teacher {args.teacher}, {layer} ({flat.shape[0]:,} tokens, {flat.shape[1]} features):")
    print(f"  {feature_energy_report(states, torch.ones(states.shape[:2]))}")
    print(f"  mean cosine between two tokens' states: {mean_pairwise_cosine(flat):.3f} raw, "
          f"{mean_pairwise_cosine(centred):.3f} centred")
    print(f"  centred variance in the top {' / '.join(map(str, tops))} principal directions: {shares}")
    print(f"  {causal_span_line(args, dataset, data_tokenizer)}")


if __name__ == "__main__":
    main()
