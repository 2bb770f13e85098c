"""The click options every package's commands share, and options read from config dataclasses.

``teacher_infer`` is the lowest layer that may import click (``labelstore`` is the store
library alone), so they live here, public, and every command module imports them: the store
commands' (``teacher_infer/_store_cli.py``, ``_select_cli.py``, ``_ensemble_cli.py``),
dedup's, the teacher pass's and ``student_train``'s.

- :func:`config_option` makes an option for one field of a config dataclass (or one keyword of
  a library function): its default (shown by ``--help``) and, where the field's ``metadata``
  names them, its choices and help come from the field, so no default is typed twice.
- :func:`threads_option` is ``--threads`` of a computing command, read from its config's
  ``threads`` field like any other option; the library entry point applies it
  (``teacher_infer.runtime.set_threads``), so the CLI and Python behave the same.
- :data:`overwrite_option`, :data:`json_option`, :data:`device_option` and
  :data:`progress_option` (``--no-progress``) are each defined once here and used by every
  command that has them.

Nothing here imports torch: ``ssld --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import click

from .runtime.device import DEVICES


def config_field(config: type, name: str) -> dataclasses.Field:
    """The dataclass field ``name`` of ``config`` (``ValueError`` naming it when absent)."""
    for spec in dataclasses.fields(config):
        if spec.name == name:
            return spec
    raise ValueError(f"{config.__name__} has no field {name!r}")


def _default_and_metadata(config: Callable, name: str) -> tuple[Any, Mapping[str, Any]]:
    if dataclasses.is_dataclass(config):
        spec = config_field(config, name)
        return spec.default, spec.metadata
    parameter = inspect.signature(config).parameters.get(name)
    if parameter is None:
        raise ValueError(f"{config.__name__} has no parameter {name!r}")
    empty = parameter.default is inspect.Parameter.empty
    return (dataclasses.MISSING if empty else parameter.default), {}


def config_option(config: Callable, name: str, *param_decls: str, **attrs: Any) -> Callable:
    """A click option whose value becomes the field ``name`` of the dataclass ``config`` (or
    the keyword argument ``name`` of the function ``config``).

    The default is the field's or the keyword's (shown by ``--help`` unless it is ``None``,
    ``False`` or ``()``); a field with ``metadata={"choices": ...}`` becomes a
    ``click.Choice`` of them and one with ``metadata={"help": ...}`` gives the help text.
    ``param_decls`` default to ``--name-with-dashes``; ``attrs`` are passed to
    ``click.option`` and win over what the field says.
    """
    default, metadata = _default_and_metadata(config, name)
    if not param_decls:
        param_decls = ("--" + name.replace("_", "-"),)
    if "choices" in metadata:
        attrs.setdefault("type", click.Choice(metadata["choices"]))
    if "help" in metadata:
        attrs.setdefault("help", metadata["help"])
    if default is not dataclasses.MISSING:
        attrs.setdefault("default", default)
        # None, False and () mean "not given": nothing to show (by identity: 0 == False)
        unset = default is None or default is False or default == ()
        attrs.setdefault("show_default", not unset)
    return click.option(*param_decls, name, **attrs)


def threads_option(config: Callable) -> Callable:
    """``--threads N``: the ``threads`` field (or keyword) of ``config``; its default None is
    shown as what it means."""
    default, _ = _default_and_metadata(config, "threads")
    return config_option(config, "threads", type=click.IntRange(min=1), help=(
        "CPU threads per process: torch, OpenMP, BLAS, OpenCV"
        + (" (default: $SSLD_THREADS when set, else the CPUs available per rank)"
           if default is None else "")
        + ". 1 is fastest when other jobs share the cores."))


overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace --out if it exists (instead of refusing, or of resuming it).")

json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print the result as JSON (for scripts) instead of text.")

# Every command that draws a bar has it; the bar itself follows labelstore.progress_bar's
# rule (rank 0, and only on a terminal: never carriage returns in a log file).
progress_option = click.option(
    "--no-progress", "progress", is_flag=True, flag_value=False, default=True,
    help="No progress bar (there is none anyway when stderr is not a terminal).")

device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
    help="auto: CUDA when available.")


__all__ = ["config_field", "config_option", "device_option", "json_option", "overwrite_option",
           "progress_option", "threads_option"]
