"""Downstream evaluation on the OLMo task suite: tasks and their data (``tasks``), log-likelihood
scoring and accuracies (``scoring``), models and the command line (``downstream``). A tool around
LET, not part of it."""
