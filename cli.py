"""The ``ssld`` command line: a thin click group.

Each command's click wiring lives in the lowest package that may import click and drives
its library: ``teacher_infer/_store_cli.py``, ``_select_cli.py`` and ``_ensemble_cli.py``
(the store commands, whose work is ``labelstore``'s), ``teacher_infer/_dedup_cli.py``,
``teacher_infer/_cli.py``, ``student_train/_cli.py``: it reads options, builds a config,
calls one library function and echoes a summary. Options shared by several commands, and
options read from config dataclasses, come from ``teacher_infer.cli_options``.
This module only assembles the group and turns user errors into one line on stderr with
exit status 2. Nothing here imports torch, so ``ssld --help`` is instant.
"""
from __future__ import annotations

import errno
import sys

import click

from labelstore import IncompleteRunError, LockedError, __version__

# Errors that mean "the user gave us something wrong" (or another run holds the output):
# one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, ImportError, LockedError)
# An output (or input) that may not be written (read): a permission denied or a read-only
# file system is the user's to fix, like any unwritable --out, whether a check before the
# work found it or a write during it did: one line, exit 2, in every command.
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)
# A run that could not finish what it was meant to write: one line, exit 1.
RUN_ERRORS = (IncompleteRunError,)


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.version_option(__version__, prog_name="ssld")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def ssld(ctx: click.Context, debug: bool) -> None:
    """Semi-supervised label knowledge distillation: label stores, selection, training."""
    ctx.obj = {"debug": debug}


def _register() -> None:
    from teacher_infer._store_cli import commands as store_commands
    from teacher_infer._select_cli import commands as select_commands
    from teacher_infer._dedup_cli import commands as dedup_commands
    from teacher_infer._ensemble_cli import commands as ensemble_commands
    from teacher_infer._cli import commands as infer_commands
    from teacher_infer._index_cli import commands as index_commands
    from teacher_infer._prepare_cli import commands as prepare_commands
    from student_train._cli import commands as train_commands
    from student_train._quickstart_cli import commands as quickstart_commands

    for command in (*store_commands, *select_commands, *dedup_commands, *ensemble_commands,
                    *infer_commands, *index_commands, *prepare_commands, *train_commands,
                    *quickstart_commands):
        ssld.add_command(command)


_register()


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _os_error(exc: OSError) -> str:
    """``No space left on device (errno 28): runs/a/last.pt`` plus what to do about it."""
    text = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    if exc.errno is not None:
        text += f" (errno {exc.errno})"
    if exc.filename is not None:
        text += f": {exc.filename}"
    if exc.errno == errno.ENOSPC:
        text += ("; free some space and run the same command again (infer-teacher resumes "
                 "the store, train-student continues with --resume)")
    return text


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the group, mapping user errors to exit status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        result = ssld.main(args=args, prog_name="ssld", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as exc:  # usage errors, bad parameters: one line too
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"ssld: error: {_one_line(exc.format_message())}{hint}", err=True)
        return 2
    except USER_ERRORS as exc:
        if debug:
            raise
        click.echo(f"ssld: error: {_one_line(str(exc)) or type(exc).__name__}", err=True)
        return 2
    except RUN_ERRORS as exc:
        if debug:
            raise
        click.echo(f"ssld: error: {_one_line(str(exc))}", err=True)
        return 1
    except OSError as exc:
        if debug:
            raise
        if isinstance(exc, PermissionError) or exc.errno in NOT_PERMITTED:
            click.echo(f"ssld: error: {_os_error(exc)}", err=True)
            return 2
        # the machine failed us (disk full, I/O error): one line, exit 1
        click.echo(f"ssld: failed: {_os_error(exc)}", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    # standalone_mode=False returns the exit code of --help/--version, else the command's value
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
