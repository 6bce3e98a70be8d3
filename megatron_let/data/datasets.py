"""Megatron GPT datasets over the corpus written by ``prepare_corpus``.

Trainers and the data pipeline's own self-check share this one function, so
the split, sequence length and cache location are interpreted identically
everywhere.  It works on CPU with or without ``torch.distributed``: when a
process group exists, ``BlendedMegatronDatasetBuilder`` lets global rank 0
build the document/sample/shuffle index caches first, barriers, and the other
ranks then only read them (every rank must therefore call this function).
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Union

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizer

__all__ = ["build_gpt_datasets", "load_tokenizer"]


def load_tokenizer(tokenizer):
    """Return a Megatron tokenizer for a Hugging Face tokenizer directory.

    GPTDatasetConfig needs Megatron's wrapper (``eod``, ``vocab_size`` and the
    ``unique_identifiers`` that go into the index-cache hash), not the HF
    object.  Objects that already are Megatron tokenizers pass through.
    """
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    return MegatronTokenizer.from_pretrained(
        str(tokenizer), metadata_path={"library": "huggingface", "model_type": "gpt"}
    )


def build_gpt_datasets(
    data_prefix: str,
    seq_length: int,
    split: str,
    train_samples: Optional[int],
    valid_samples: Optional[int],
    seed: int,
    tokenizer: Union[str, os.PathLike, object],
    *,
    test_samples: Optional[int] = None,
    path_to_cache: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    **config_kwargs,
) -> List[Optional[GPTDataset]]:
    """Build ``[train, valid, test]`` GPTDatasets from one indexed dataset.

    Args:
        data_prefix: path of ``<prefix>.bin/.idx`` without extension.
        seq_length: tokens per sample; each sample holds ``seq_length + 1``
            tokens so inputs and shifted labels are both ``seq_length`` long.
        split: Megatron split weights over *documents*, e.g. ``"98,2,0"``.
        train_samples / valid_samples / test_samples: samples to draw per
            split (the data is repeated in further epochs if needed); ``None``
            means exactly one epoch of that split.
        seed: seed of Megatron's document/sample shuffles.
        tokenizer: HF tokenizer directory (or a Megatron tokenizer object).
        path_to_cache: index-cache directory; defaults to ``<dir>/cache`` next
            to the data (Megatron's own default would nest a directory under
            the prefix name).  The cache key does not cover the .bin contents,
            so whoever rewrites the data must clear it (prepare_corpus does).
        is_built_on_rank: Megatron's hook for which ranks get a dataset at all
            (e.g. only the first/last pipeline stage); default every rank.
        config_kwargs: overrides for GPTDatasetConfig, e.g.
            ``create_attention_mask=False`` or ``eod_mask_loss=True``.

    Returns:
        Three entries, ``None`` for a split with zero weight (or on a rank
        where ``is_built_on_rank()`` is False while distributed).
    """
    data_prefix = os.path.abspath(str(data_prefix))
    if path_to_cache is None:
        path_to_cache = os.path.join(os.path.dirname(data_prefix), "cache")
    options = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    options.update(config_kwargs)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=load_tokenizer(tokenizer),
        **options,
    )
    sizes = [train_samples, valid_samples, test_samples]
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    return builder.build()
