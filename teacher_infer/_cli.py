"""Commands of this package, registered on the ``ssld`` group by ``cli.py``."""
commands: list = []
