"""Drivers that put LET into a training loop someone else wrote.

``launch`` turns parsed flags into a checked ``LateToEarlyTraining`` before any process group exists
(shared by both trainers); ``megatron_lm`` wires LET into Megatron-LM's own ``pretrain()``;
``patching`` applies the same wiring to a user's own copy of ``pretrain_gpt.py``. Changes here when
Megatron-LM's training loop changes.
"""
