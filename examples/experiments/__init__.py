"""Small A/B experiments with ``pretrain_gpt_let.py`` (the quickstart, the convergence benchmark).

``cache`` (stages reused when their inputs are unchanged), ``tiny_teacher`` (a small Hugging Face
Llama trained on the corpus: the quickstart's teacher), ``runs`` (launching ``pretrain_gpt_let.py``
and reading Megatron-LM's log lines) and ``compare`` (paired comparison at matched loss, the plot).
A tool around LET, not part of the library: imported as ``experiments`` with ``examples/`` on ``sys.path``
(``examples/quickstart.py`` is there; ``benchmarks/convergence.py`` and ``tests/let_testing.py`` put it there).
"""
