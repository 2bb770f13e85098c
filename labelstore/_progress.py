"""The one rule for progress bars, used by every command (docs/architecture.md).

A bar is drawn when the caller asks for one (``--no-progress`` not given; rank 0 under
torchrun) *and* stderr is a terminal: tqdm redraws with carriage returns, which a log
file keeps, every one of them, so a job's log would fill with bars. Elsewhere the bar is a
silent stand-in, and the one-line summary each command prints at the end is the record.
tqdm is imported only when a bar is drawn (the store library needs it for nothing else).
"""
from __future__ import annotations

import sys
from typing import Any


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "rows",
                 **options: Any):
    """A tqdm bar on stderr (rate and ETA; ``options`` go to tqdm), or a stand-in with the
    same methods that draws nothing, unless ``enabled`` and stderr is a terminal."""
    if not (enabled and _is_terminal(sys.stderr)):
        return _NoBar()
    from tqdm.auto import tqdm

    settings = dict(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                    dynamic_ncols=True, mininterval=0.2, file=sys.stderr)
    settings.update(options)
    return tqdm(**settings)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # replaced by an object without it, or closed
        return False


class _NoBar:
    """What the commands use of a tqdm bar, doing nothing."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
