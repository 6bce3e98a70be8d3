"""Tokenizer, datasets and micro-batch iterators in Megatron-LM's sample order."""

from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers import MegatronTokenizer

from megatron_let.data.datasets import build_gpt_datasets
from megatron_let.megatron_versions import null_tokenizer


def build_tokenizer(args):
    """Megatron tokenizer for --tokenizer-type (a Hugging Face directory, or null for mock data)."""
    if args.tokenizer_type == "NullTokenizer":
        return null_tokenizer(args.vocab_size)
    return MegatronTokenizer.from_pretrained(args.tokenizer_model,
                                             metadata_path={"library": "huggingface", "model_type": "gpt"})


def build_datasets(args, tokenizer):
    """(train, valid) datasets sized for the whole run, as Megatron-LM sizes them."""
    train_samples = getattr(args, "train_samples", None) or args.train_iters * args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    valid_samples = evals * args.eval_iters * args.global_batch_size
    options = dict(reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
                   eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.reset_attention_mask)
    if args.mock_data:
        config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length, blend=None,
                                  split=args.split, tokenizer=tokenizer, path_to_cache=args.data_cache_path,
                                  **options)
        train, valid, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [train_samples, valid_samples, 0],
                                                        lambda: True, config).build()
        return train, valid
    if len(args.data_path) != 1:
        raise ValueError("the megatron-core trainer reads one --data-path prefix; blends need Megatron-LM")
    train, valid, _ = build_gpt_datasets(args.data_path[0], args.seq_length, split=args.split,
                                         train_samples=train_samples, valid_samples=valid_samples or None,
                                         seed=args.seed, tokenizer=tokenizer,
                                         path_to_cache=args.data_cache_path, **options)
    return train, valid


def microbatches(dataset, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 count: Optional[int] = None) -> Iterator[dict]:
    """Megatron's pretraining sampler: each step takes mbs x DP samples; DP rank r its r-th slice."""
    step = 0
    while count is None or step < count:
        start = first_sample + step * micro_batch_size * dp_size + dp_rank * micro_batch_size
        samples = [dataset[i % len(dataset)] for i in range(start, start + micro_batch_size)]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
        batch.setdefault("attention_mask", None)
        yield batch
        step += 1
