"""The click options every package's commands share, and options read from config dataclasses.

``labelstore`` is the lowest layer whose commands need them, so they live here, public, and
``teacher_infer/_cli.py``, ``student_train/_cli.py`` and the other command modules import them:

- :func:`config_option` makes an option for one field of a config dataclass (or one keyword of
  a library function): its default (shown by ``--help``) and, where the field's ``metadata``
  names them, its choices and help come from the field, so no default is typed twice.
- :data:`overwrite_option`, :data:`threads_option`, :data:`json_option` and
  :data:`device_option` are each defined once here and used by every command that has them.

Nothing here imports torch: ``ssld --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping

import click

from ._threads import DEFAULT_THREADS, set_threads

DEVICES = ("auto", "cpu", "cuda")   # the one list: both configs take theirs from here


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


def _apply_threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    return set_threads(value)


overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace --out if it exists (instead of refusing, or of resuming it).")

threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=DEFAULT_THREADS, show_default=True,
    callback=_apply_threads, help="CPU threads (torch, BLAS, OpenCV). 1 is fastest when other "
    "jobs share the cores; on an idle machine, try the number of cores.")

json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print the result as JSON (for scripts) instead of text.")

device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
    help="auto: CUDA when available.")


def is_main_process() -> bool:
    """False on the ranks other than 0 under torchrun, which print no summary."""
    return int(os.environ.get("RANK", "0") or 0) == 0


__all__ = ["DEVICES", "config_field", "config_option", "device_option", "is_main_process",
           "json_option", "overwrite_option", "threads_option"]
