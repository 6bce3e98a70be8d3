"""A lean GPT trainer assembled from megatron-core parts (used when Megatron-LM is absent)."""
