"""Study 2: when do teacher-selected unlabeled images help? (``run.py``, ``report.py``)."""
