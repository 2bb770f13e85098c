"""The CLI's options: defaults and choices read from the config dataclasses, shared options
defined once (teacher_infer/cli_options.py)."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import cli
import labelstore
import teacher_infer
from labelstore import inspect_store
from student_train.config import DECODERS as TRAIN_DECODERS
from student_train.config import DEVICES as TRAIN_DEVICES
from student_train.config import TrainConfig
from student_train.quickstart import QuickstartConfig
from teacher_infer import cli_options
from teacher_infer.config import DECODERS as INFER_DECODERS
from teacher_infer.config import DEVICES as INFER_DEVICES
from teacher_infer.config import InferConfig
from teacher_infer.dedup import DedupConfig
from teacher_infer.prepare import prepare_digits, prepare_fashion_mnist
from teacher_infer.runtime import DEVICES

REPO = Path(__file__).resolve().parents[1]
NO_DEFAULT = click.Option(["--probe"]).default  # None, or click 8.3+'s UNSET sentinel


def command(*path: str) -> click.Command:
    found: click.Command = cli.ssld
    for name in path:
        found = found.commands[name]
    return found


def options(cmd: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in cmd.params if isinstance(p, click.Option)}


def help_text(cmd: click.Command, option: click.Option) -> str:
    with click.Context(cmd, info_name=cmd.name) as ctx:
        return option.get_help_record(ctx)[1]


def unset(value) -> bool:
    return value is None or value is False or value == ()


# command, its config, the fields that have no option, the options that are no field, and
# the options with a default of their own
CONFIG_COMMANDS = [
    (("infer-teacher",), InferConfig, {"extra"}, set(), set()),
    (("train-student",), TrainConfig, {"momentum", "label_smoothing"}, set(), set()),
    (("quickstart",), QuickstartConfig,
     {"views", "topk", "batch_size", "val_every"}, set(), set()),
    (("dedup",), DedupConfig, {"query_batch", "pool_batch"}, set(),
     {"out"}),  # "-" = stdout on the command line; None (no file) from Python
]
SHARED = {"overwrite": cli_options.overwrite_option, "device": cli_options.device_option,
          "as_json": cli_options.json_option, "progress": cli_options.progress_option}


@pytest.mark.parametrize("path, config, without_option, not_fields, own_default",
                         CONFIG_COMMANDS, ids=lambda v: v[0] if isinstance(v, tuple) else None)
def test_every_config_option_has_the_dataclass_default_and_shows_it(path, config,
                                                                   without_option, not_fields,
                                                                   own_default):
    cmd, fields = command(*path), {f.name: f for f in dataclasses.fields(config)}
    opts = options(cmd)
    assert set(fields) - set(opts) == without_option     # no field forgotten by the CLI
    assert set(opts) - set(fields) == not_fields         # no option invented beside the config
    for name, option in opts.items():
        if name not in fields or name in SHARED or name in own_default:
            continue
        spec = fields[name]
        if spec.default is dataclasses.MISSING:  # required, or None for the library to refuse
            assert option.required or option.default in (None, NO_DEFAULT), name
            continue
        default = tuple(option.default) if isinstance(option.default, list) else option.default
        assert default == spec.default, name
        if "choices" in spec.metadata:
            assert tuple(option.type.choices) == tuple(spec.metadata["choices"]), name
        shown = re.search(r"\[default: ([^\]]*)\]", help_text(cmd, option))
        assert bool(shown) == (not unset(spec.default)), name


@pytest.mark.parametrize("path, decoders", [(("infer-teacher",), INFER_DECODERS),
                                            (("train-student",), TRAIN_DECODERS),
                                            (("eval",), TRAIN_DECODERS)])
def test_decoder_choices_are_the_configs(path, decoders):
    assert tuple(options(command(*path))["decoder"].type.choices) == decoders


def test_shared_device_option_agrees_with_every_config():
    assert DEVICES == INFER_DEVICES == TRAIN_DEVICES
    assert tuple(options(command("dedup"))["device"].type.choices) == DEVICES
    for config in (InferConfig, TrainConfig, QuickstartConfig, DedupConfig):
        assert cli_options.config_field(config, "device").default == "auto"


# every command that computes, and what its --threads becomes (a config field or a keyword)
THREADS = [(("infer-teacher",), InferConfig), (("train-student",), TrainConfig),
           (("dedup",), DedupConfig), (("quickstart",), QuickstartConfig),
           (("eval",), "student_train.evaluation.evaluate"), (("verify",), teacher_infer.verify)]


@pytest.mark.parametrize("path, target", THREADS, ids=lambda v: v[0] if isinstance(v, tuple)
                         else None)
def test_threads_is_a_field_of_every_computing_command(path, target):
    """--threads is the config's field (or the function's keyword), its default included:
    None (the CPUs per rank) everywhere but the quickstart, which asks for 1."""
    if isinstance(target, str):
        import importlib

        module, name = target.rsplit(".", 1)
        target = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(target):
        default = cli_options.config_field(target, "threads").default
    else:
        default = inspect.signature(target).parameters["threads"].default
    option = options(command(*path))["threads"]
    assert option.default == default or (default is None and option.default is NO_DEFAULT)
    assert option.type.min == 1
    assert default == (1 if target is QuickstartConfig else None), path
    shown = help_text(command(*path), option)
    assert ("the CPUs available per rank" in shown) == (default is None), shown


def test_loss_choices_are_the_losses_the_trainer_knows():
    from student_train.loss_registry import LOSS_SPECS
    from student_train.losses import LOSSES

    choices = cli_options.config_field(TrainConfig, "loss").metadata["choices"]
    assert tuple(LOSSES) == tuple(choices) == tuple(LOSS_SPECS)
    assert tuple(options(command("train-student"))["loss"].type.choices) == tuple(choices)


# commands without a config: the options that are a keyword of the function they call
FUNCTION_COMMANDS = [
    (("prepare", "digits"), prepare_digits, set()),
    (("prepare", "fashion-mnist"), prepare_fashion_mnist, set()),
    (("select-topk",), labelstore.select_topk, set()),
    (("ensemble",), labelstore.ensemble, set()),
    (("inspect",), inspect_store, set()),
    (("verify",), labelstore.verify, set()),  # the structure check's tolerances
]


@pytest.mark.parametrize("path, function, own_default", FUNCTION_COMMANDS,
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_option_defaults_are_the_library_functions(path, function, own_default):
    cmd, parameters = command(*path), inspect.signature(function).parameters
    matched = 0
    for name, option in options(cmd).items():
        if name not in parameters or name in SHARED or name in own_default or option.required:
            continue
        default = parameters[name].default
        assert option.default == default or (default is None and option.default is NO_DEFAULT), name
        shown = re.search(r"\[default: ([^\]]*)\]", help_text(cmd, option))
        assert bool(shown) == (not unset(default)), name
        matched += 1
    assert matched >= 1


def _all_commands(group: click.Group = cli.ssld):
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd)
        else:
            yield cmd


def test_every_option_of_every_command_says_what_it_does():
    """docs/cli.md is generated from these help texts: an option without one is a blank row."""
    commands = list(_all_commands())
    assert len(commands) >= 14
    bare = [f"{cmd.name} {param.opts[0]}" for cmd in commands for param in cmd.params
            if isinstance(param, click.Option) and not param.hidden
            and not (param.help or "").strip()]
    assert not bare, bare


def _made_by(decorator) -> click.Option:
    @click.command()
    @decorator
    def probe(**kwargs):
        pass

    return probe.params[0]


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_options_are_one_definition_on_every_command(name):
    wanted = _made_by(SHARED[name]).to_info_dict()
    users = [cmd for cmd in _all_commands() if name in options(cmd)]
    assert len(users) >= 2, name
    for cmd in users:
        assert options(cmd)[name].to_info_dict() == wanted, (cmd.name, name)


def test_shared_options_are_spelled_only_in_cli_options():
    modules = [REPO / "cli.py", *REPO.glob("*/_*cli.py")]
    assert len(modules) >= 8
    for flag in ("--overwrite", "--threads", "--device", "--json", "--no-progress"):
        spelled = [path.name for path in modules if f'"{flag}"' in path.read_text()]
        assert spelled == [], flag
    assert '"--overwrite"' in (REPO / "teacher_infer" / "cli_options.py").read_text()


def test_config_option_reads_default_choices_and_help_from_the_field():
    @dataclasses.dataclass
    class Config:
        name: str
        colour: str = dataclasses.field(default="red", metadata={
            "choices": ("red", "blue"), "help": "The colour."})
        count: int = 0
        limit: int | None = None

    @click.command()
    @cli_options.config_option(Config, "name", required=True)
    @cli_options.config_option(Config, "colour")
    @cli_options.config_option(Config, "count", help="How many.")
    @cli_options.config_option(Config, "limit", type=int)
    def probe(**kwargs):
        click.echo(repr(Config(**kwargs)))

    opts = options(probe)
    assert opts["colour"].type.choices == ("red", "blue")
    assert "The colour." in help_text(probe, opts["colour"])
    assert "[default: red]" in help_text(probe, opts["colour"])
    assert "[default: 0]" in help_text(probe, opts["count"])      # 0 is shown, None is not
    assert "default" not in help_text(probe, opts["limit"])
    result = CliRunner().invoke(probe, ["--name", "x", "--colour", "blue"])
    assert result.output.strip().endswith("(name='x', colour='blue', count=0, limit=None)")
    assert CliRunner().invoke(probe, ["--name", "x", "--colour", "green"]).exit_code == 2
    with pytest.raises(ValueError, match="no field 'size'"):
        cli_options.config_option(Config, "size")


def test_only_rank_0_prints_the_summary(monkeypatch, capsys, one_torch_thread):
    import teacher_infer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # --threads sets it; restored after
    monkeypatch.setattr(teacher_infer, "run", lambda cfg: f"labelled {cfg.data}")
    args = ["infer-teacher", "--model", "resnet18", "--random-weights", "--data", "d",
            "--out", "o.zarr"]
    monkeypatch.setenv("WORLD_SIZE", "2")   # as torchrun sets them
    monkeypatch.setenv("RANK", "1")
    assert cli.main(args) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(args) == 0
    assert capsys.readouterr().out == "labelled d\n"


def test_defaults_of_eval_and_verify_are_their_functions():
    # these two commands' functions import torch, so the options read shared constants; the
    # functions must use the same ones
    from student_train.evaluation import evaluate
    from teacher_infer.recompute import verify

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert options(command("eval"))["batch_size"].default == default(evaluate, "batch_size")
    assert options(command("eval"))["threads"].default in (default(evaluate, "threads"),
                                                          NO_DEFAULT)
    assert default(verify, "threads") is default(teacher_infer.verify, "threads") is None
    verify_options = options(command("verify"))
    assert verify_options["sample"].default == default(verify, "sample")
    assert verify_options["seed"].default == default(verify, "seed")
