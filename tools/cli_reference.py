"""docs/cli.md, generated from the click commands so that it cannot drift from them.

    python -m tools.cli_reference            # rewrite docs/cli.md
    python -m tools.cli_reference --check    # exit 1 when docs/cli.md differs (tests/test_docs.py)

Every command of the ``ssld`` group (sub-commands of a group included) gets its usage, its help
and a table of its options: what ``--help`` shows (the option column is click's own, the default
and range are click's help extras), in pipeline order (``SECTIONS``). A command that no section
names is listed under "Other commands", so a new command is never left out. Needs click >= 8.2
(``Option.get_help_extra``).
"""
from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "docs" / "cli.md"
COMMAND = "python -m tools.cli_reference"

# (title, one line on what the commands are for, the commands in pipeline order)
SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Data", "Data sets to run the pipeline on.",
     ("prepare", "index")),
    ("The teacher pass", "A teacher runs once over labeled images and an unlabeled pool and "
     "writes its top-k soft labels into a label store.", ("infer-teacher",)),
    ("Selection", "Work on stores alone (dedup reads images only to confirm a pair): the pool "
     "images worth training on, and one training store.",
     ("dedup", "select-topk", "merge", "ensemble")),
    ("Training", "A student distilled from the stored labels, and its accuracy.",
     ("train-student", "eval")),
    ("Store tools", "What a store holds, an HDF5 copy of it, and whether it is what it says.",
     ("inspect", "export", "verify")),
    ("All in one", "The whole pipeline on a small real data set, as a demonstration.",
     ("quickstart",)),
)

INTRO = """\
Every `ssld` command with every option, as `ssld COMMAND --help` shows it, in pipeline order.
What the commands do together, with the recipe at ImageNet scale, is in the
[README](../README.md); the longer explanations per command (data sources, views, selection
rules, ensembles, verify, training) are in [commands.md](commands.md); the label store they read
and write is [format.md](format.md).

Conventions of every command: bad input (a missing file, an unknown option, a value out of
range) is one line on stderr, `ssld: error: …`, and exit status 2; a failure of the machine (a
full disk, an I/O error) or a run that could not finish is one line and exit status 1.
`ssld --debug COMMAND …` shows the traceback instead (the group's options, below); `-h`/`--help`
works on every command. `infer-teacher`, `dedup`, `train-student` and `eval` split their work
over the ranks of `torchrun … -m cli COMMAND …` (one process per GPU, on one machine or several).
"""


@dataclass
class Entry:
    """A command and where it sits in the group (``path``: ``["prepare", "digits"]``)."""

    path: list[str]
    command: click.Command
    ctx: click.Context


def _walk(command: click.Command, path: list[str], parent: click.Context):
    ctx = click.Context(command, info_name=path[-1], parent=parent)
    yield Entry(path, command, ctx)
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _walk(command.commands[name], path + [name], ctx)


def _cell(text: str) -> str:
    """Text for a markdown table cell: one line, pipes escaped (GitHub's rule, also inside
    code spans; the site's hook unescapes those)."""
    return " ".join(text.split()).replace("|", "\\|")


def _help_blocks(text: str) -> list[str]:
    """A command's help as markdown: paragraphs joined into lines, click's ``\\b`` paragraphs
    (kept as written) as code blocks, marked for the examples test (tests/test_docs.py)."""
    out = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = paragraph.splitlines()
        if lines and lines[0].strip() == "\b":
            body = "\n".join(lines[1:])
            is_command = body.lstrip().startswith("ssld ")
            out.append(("<!-- example: illustrative -->\n```bash\n" if is_command
                        else "```text\n") + body + "\n```")
        else:
            out.append(" ".join(paragraph.split()))
    return out


def _option_rows(entry: Entry) -> list[str]:
    rows = []
    for param in entry.command.get_params(entry.ctx):
        if not isinstance(param, click.Option) or param.hidden or "--help" in param.opts:
            continue
        record = param.get_help_record(entry.ctx)
        if record is None:
            continue
        extra = param.get_help_extra(entry.ctx)
        default = extra.get("default", "")
        if isinstance(param.show_default, str):
            default = param.show_default  # click puts a written default in parentheses
        default = "required" if extra.get("required") else f"`{default}`" if default else ""
        meaning = param.help or ""
        if extra.get("range"):
            meaning += f" ({extra['range']})"
        if param.multiple and "repeat" not in meaning.lower():
            meaning += " Repeatable."
        rows.append(f"| `{_cell(record[0])}` | {_cell(default)} | {_cell(meaning)} |")
    return rows


def _command(entry: Entry, level: int) -> str:
    name = " ".join(entry.path)
    usage = " ".join([name, *entry.command.collect_usage_pieces(entry.ctx)])
    parts = [f"{'#' * level} `{name}`", f"`{usage}`"]
    parts += _help_blocks(entry.command.help or "")
    if isinstance(entry.command, click.Group):
        subs = sorted(entry.command.commands)
        parts.append("Sub-commands: " + ", ".join(f"`{name} {sub}`" for sub in subs) + ".")
    rows = _option_rows(entry)
    if rows:
        parts.append("\n".join(["| option | default | meaning |", "|---|---|---|", *rows]))
    return "\n\n".join(parts)


def render(group: click.Group | None = None) -> str:
    """docs/cli.md for ``group`` (``cli.ssld``, the console script's group)."""
    if group is None:
        from cli import ssld as group
    root = click.Context(group, info_name="ssld")
    entries = {tuple(e.path[1:]): e for e in _walk(group, ["ssld"], None) if len(e.path) > 1}
    top = [name for name in group.commands]
    sections = [(title, about, [n for n in names if n in group.commands])
                for title, about, names in SECTIONS]
    placed = {n for _, _, names in sections for n in names}
    others = sorted(n for n in top if n not in placed)
    if others:
        sections.append(("Other commands", "Commands not yet placed in the pipeline order.",
                         others))
    head = ["# Command reference",
            f"<!-- Generated by `{COMMAND}` from the click commands: edit the commands' help, "
            "not this file. -->",
            INTRO.strip(),
            f"`{' '.join(['ssld', *group.collect_usage_pieces(root)])}`",
            "\n".join(["| option | default | meaning |", "|---|---|---|",
                       *_option_rows(Entry(["ssld"], group, root))])]
    sections = [section for section in sections if section[2]]
    head.append("\n".join(f"- **{title}**: " + ", ".join(
        f"[`{name}`](#ssld-{name})" for name in names) for title, _, names in sections))
    body = []
    for title, about, names in sections:
        body += [f"## {title}", about]
        for name in names:
            body.append(_command(entries[(name,)], 3))
            for path, entry in entries.items():
                if len(path) == 2 and path[0] == name:
                    body.append(_command(entry, 4))
    return "\n\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/cli.md is not what the commands generate")
    parser.add_argument("--out", type=Path, default=TARGET, help="default: docs/cli.md")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date with the click commands; run: {COMMAND}",
                  file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
