"""The examples in the project's markdown, and the check of their ``ssld`` command lines.

A fenced block in README.md or docs/ whose language is python or a shell (``EXAMPLE_LANGUAGES``)
is an example, and the line right before its opening fence says what tests/test_docs.py does
with it:

    <!-- example: run -->                run as written in an empty temporary folder
    <!-- example: run setup=NAME -->     the same, after the tests' setup NAME has put there the
                                         files the block reads (stores, images, exports)
    <!-- example: run continue -->       in the folder, and for python with the variables, of
                                         the block before it in the same file
    <!-- example: illustrative -->       not run (ImageNet paths, GPUs, several machines); a
                                         python block is compiled

The ``ssld`` command lines of every example (``ssld CMD …``, ``torchrun … -m cli CMD …``,
``python -m cli CMD …``) are checked against the click commands: the command exists and so does
every option name.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click

EXAMPLE_LANGUAGES = {"python", "py", "python3", "bash", "sh", "shell", "console", "zsh"}
PYTHON = {"python", "py", "python3"}
KINDS = ("run", "illustrative")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<body>.*?)\s*-->\s*$")
_NUMBER = re.compile(r"^-\d")
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}


@dataclass(frozen=True)
class Block:
    """A fenced code block: ``line`` is its opening fence's (1-based), ``text`` its content."""

    path: Path
    line: int
    language: str
    text: str
    kind: str | None = None          # "run", "illustrative", None: no marker
    setup: str | None = None
    cont: bool = False

    @property
    def is_example(self) -> bool:
        return self.language in EXAMPLE_LANGUAGES

    @property
    def is_python(self) -> bool:
        return self.language in PYTHON

    def where(self, root: Path | None = None) -> str:
        path = self.path.relative_to(root) if root else self.path
        return f"{path}:{self.line}"


def _marker(line: str, where: str) -> dict:
    """The marker's fields; ValueError naming ``where`` for one that is not the syntax."""
    words = _MARKER.match(line)["body"].split()
    if not words or words[0] not in KINDS:
        raise ValueError(f"{where}: an example marker starts with one of {KINDS}: {line.strip()}")
    fields = {"kind": words[0], "setup": None, "cont": False}
    for word in words[1:]:
        if word == "continue" and words[0] == "run":
            fields["cont"] = True
        elif word.startswith("setup=") and words[0] == "run" and len(word) > 6:
            fields["setup"] = word[6:]
        else:
            raise ValueError(f"{where}: unknown word {word!r} in the marker {line.strip()} "
                             "(run takes setup=NAME and continue; illustrative takes nothing)")
    return fields


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with its marker. ValueError for a marker that is
    not right before a fence, or not the syntax, and for a block never closed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    pending: tuple[int, dict] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _MARKER.match(line):
            if pending is not None:
                raise ValueError(f"{path}:{pending[0]}: example marker not right before a fence")
            pending = (i + 1, _marker(line, f"{path}:{i + 1}"))
            i += 1
            continue
        opening = _FENCE.match(line)
        if opening is None:
            if pending is not None:
                raise ValueError(f"{path}:{pending[0]}: example marker not right before a fence")
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = (opening["info"].split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and set(lines[j].strip()) == {fence[0]}):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: a code block that is never closed")
        fields = pending[1] if pending is not None else {}
        found.append(Block(path, i + 1, language, "\n".join(body) + "\n", **fields))
        pending = None
        i = j + 1
    if pending is not None:
        raise ValueError(f"{path}:{pending[0]}: example marker not right before a fence")
    return found


def _uncommented(line: str) -> str:
    """The line without its shell comment: from an unquoted ``#`` that starts a word."""
    quote = None
    for at, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (at == 0 or line[at - 1].isspace()):
            return line[:at].rstrip()
    return line


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(0-based line, line) with comments dropped and backslash continuations joined."""
    out, start, parts = [], 0, []
    for number, line in enumerate(map(_uncommented, text.splitlines())):
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        out.append((start, " ".join(parts)))
        parts = []
    if parts:
        out.append((start, " ".join(parts)))
    return out


def _simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""   # _logical_lines dropped them
    commands, current = [], []
    for token in lexer:
        if token in _SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def programs(text: str) -> list[str]:
    """The program each simple command of a shell block starts (variable assignments skipped)."""
    found = []
    for _, line in _logical_lines(text):
        for words in _simple_commands(line):
            words = [w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)] or [""]
            found.append(words[0])
    return [p for p in found if p]


def ssld_invocations(text: str) -> list[tuple[int, list[str]]]:
    """(0-based line, arguments after ``ssld``) of each ssld command line of a shell block:
    ``ssld ARGS``, ``torchrun … -m cli ARGS``, ``python -m cli ARGS``."""
    found = []
    for number, line in _logical_lines(text):
        for words in _simple_commands(line):
            if "ssld" in words:
                found.append((number, words[words.index("ssld") + 1:]))
            else:
                for at in range(len(words) - 1):
                    if words[at:at + 2] == ["-m", "cli"]:
                        found.append((number, words[at + 2:]))
                        break
    return found


def _option_names(command: click.Command, ctx: click.Context) -> set[str]:
    return {name for param in command.get_params(ctx) if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)}


def command_problems(args: list[str], group: click.Group) -> list[str]:
    """What in ``ssld ARGS`` the click commands do not have: an unknown command or sub-command,
    an unknown option name. Values are not checked (paths of other machines are fine)."""
    problems: list[str] = []
    command: click.Command = group
    path = ["ssld"]
    ctx = click.Context(group, info_name="ssld")
    i = 0
    while isinstance(command, click.Group):
        names = _option_names(command, ctx)
        while i < len(args) and args[i].startswith("-"):
            if args[i].split("=", 1)[0] not in names:
                problems.append(f"{' '.join(path)}: no option {args[i].split('=', 1)[0]}")
            i += 1
        if i == len(args):
            return problems
        sub = command.commands.get(args[i])
        if sub is None:
            problems.append(f"{' '.join(path)}: no command {args[i]!r}")
            return problems
        path.append(args[i])
        ctx = click.Context(sub, info_name=args[i], parent=ctx)
        command, i = sub, i + 1
    names = _option_names(command, ctx)
    for word in args[i:]:
        if word.startswith("-") and word != "-" and not _NUMBER.match(word):
            if word.split("=", 1)[0] not in names:
                problems.append(f"{' '.join(path)}: no option {word.split('=', 1)[0]}")
    return problems
