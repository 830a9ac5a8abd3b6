"""The one runner of the ``moelpr`` commands: a user's mistake becomes one line and an exit status, a bug keeps its
traceback."""

from __future__ import annotations

import argparse

import pytest

from moelpr.checkpoints.slim import SlimCheckpointError
from moelpr.checkpoints.streaming import CheckpointError
from moelpr.cli.runner import UsageError, run_command
from moelpr.evaluation.errors import EvaluationError
from moelpr.evaluation.intervals import MismatchedDocuments
from moelpr.export.format import ExportError
from moelpr.jsonl_texts import MalformedJsonl
from moelpr.upcycling.layer_allocation import AllocationError
from moelpr.upcycling.llama_pro import ExpansionError
from moelpr.upcycling.settings import UpcyclingError

FAILURES = {
    "usage": UsageError("--fail: not what the command takes"),
    "data": EvaluationError("the held-out file holds no text"),
    "bug": KeyError("a bug"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelpr demo")
    parser.add_argument("--fail", choices=list(FAILURES))
    return parser


def _command(args: argparse.Namespace) -> None:
    if args.fail:
        raise FAILURES[args.fail]
    print("done")


def test_user_errors_become_one_line_and_their_exit_status(capsys):
    assert run_command("demo", _parser(), _command, []) == 0
    assert capsys.readouterr().out == "done\n"
    assert run_command("demo", _parser(), _command, ["--fail", "usage"]) == 2
    assert capsys.readouterr().err == "moelpr demo: error: --fail: not what the command takes\n"
    assert run_command("demo", _parser(), _command, ["--fail", "data"]) == 1
    assert capsys.readouterr().err == "moelpr demo: error: the held-out file holds no text\n"


def test_bugs_and_argparse_keep_their_own_behaviour(capsys):
    with pytest.raises(KeyError):
        run_command("demo", _parser(), _command, ["--fail", "bug"])
    with pytest.raises(SystemExit) as exit_info:
        run_command("demo", _parser(), _command, ["--fail", "other"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error_class",
    [
        CheckpointError,
        SlimCheckpointError,
        UpcyclingError,
        AllocationError,
        ExpansionError,
        ExportError,
        EvaluationError,
        MismatchedDocuments,
        MalformedJsonl,
    ],
)
def test_the_librarys_user_errors_reach_the_runner(error_class, capsys):
    def command(args: argparse.Namespace) -> None:
        raise error_class("a user's mistake")

    assert run_command("demo", _parser(), command, []) in (1, 2)
    assert capsys.readouterr().err == "moelpr demo: error: a user's mistake\n"
