"""``key=value`` overrides and options in any order, for every command that takes overrides."""

import argparse

import pytest

from tread_scale.cli import build_parser, main

from tests.conftest import REPO

#: Options of each command that takes overrides (required ones included), as they would be typed.
OPTIONS = {
    "train": [],
    "dry-run": ["--world-size", "64", "--gpu-memory", "80GB", "--project", "--max-nodes", "4"],
}
OVERRIDES = ["parallelism.backend=deepspeed", "routing.routes[0].rate=0.25", "train.global_batch_size=128"]


def _commands_with_overrides() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(name for name, p in sub.choices.items()
                  if any(a.dest == "overrides" for a in p._actions if not a.option_strings))


def test_every_command_with_overrides_is_covered():
    assert _commands_with_overrides() == sorted(OPTIONS)


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_options_before_between_and_after_overrides_parse_the_same(command):
    opts, cfg = OPTIONS[command], "yamls/tread_xl2.yaml"
    orders = [
        [cfg, *opts, *OVERRIDES],                      # options first
        [cfg, *OVERRIDES, *opts],                      # options last (rejected before intermixed parsing)
        [*opts, cfg, *OVERRIDES],                      # options before the config
        [cfg, OVERRIDES[0], *opts, *OVERRIDES[1:]],    # options between overrides
    ]
    parsed = [vars(build_parser().parse_args([command, *args])) for args in orders]
    assert parsed[0]["overrides"] == OVERRIDES and parsed[0]["config"] == cfg
    assert all(p == parsed[0] for p in parsed[1:]), parsed


def test_dry_run_with_options_after_overrides_runs(capsys):
    cfg = str(REPO / "yamls" / "demo.yaml")
    assert main(["dry-run", cfg, "--world-size", "2", "parallelism.backend=fsdp", "train.global_batch_size=32"]) == 0
    after = capsys.readouterr().out
    assert main(["dry-run", cfg, "parallelism.backend=fsdp", "train.global_batch_size=32", "--world-size", "2"]) == 0
    assert capsys.readouterr().out == after
    assert "fsdp over 2 rank(s): global batch 32" in after


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["dry-run", "c.yaml", "a=1", "--world-size", "8", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dry-run", "--world-size", "8"])
    assert "required: config" in capsys.readouterr().err
