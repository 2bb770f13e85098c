"""Study 3: does replayed augmentation make stored labels a better teacher? (``run.py``,
``report.py``)."""
