"""Study 1: the SSLD ablation table on Fashion-MNIST (``run.py``, ``report.py``)."""
