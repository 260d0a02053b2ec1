"""Command-line interface: ``rxt <command>`` (also ``python -m rxt``).

One table, :data:`COMMANDS`, maps each command name to the function that declares its flags
and the typed function that runs it (a :class:`Group` holds sub-commands, as ``rxt bench``).
argparse only parses: :func:`main` calls the command's function with the parsed flags as
keyword arguments, each flag's ``dest`` naming a parameter, so no ``argparse.Namespace`` goes
past the dispatch. A user error (``ValueError``, ``FileNotFoundError``, ``ImportError``) is one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rxt.cli import bench, chat, data, demo, evaluate, info, serve, train


@dataclass(frozen=True)
class Command:
    """One command: its line in ``rxt --help``, its flags, and the function they are passed to."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., int]


@dataclass(frozen=True)
class Group:
    """A command made of sub-commands (``rxt bench latency``)."""

    help: str
    commands: dict[str, Command]


COMMANDS: dict[str, Command | Group] = {
    "info": Command(
        "parameter counts and per-turn cost of the presets", info.add_arguments, info.cmd_info
    ),
    "demo": Command(
        "train RxT and the baselines, evaluate, write a report (~20 min, 2 CPUs)",
        demo.add_arguments,
        demo.cmd_demo,
    ),
    "chat": Command("interactive chat with a saved model", chat.add_arguments, chat.run_chat),
    "serve": Command(
        "OpenAI-compatible server keeping each conversation's STM",
        serve.add_arguments,
        serve.cmd_serve,
    ),
    "bench": Group(
        "latency and throughput benchmarks",
        {
            "latency": Command(
                "per-turn latency, RxT vs stateless",
                bench.add_latency_arguments,
                bench.cmd_bench_latency,
            ),
            "throughput": Command(
                "batched engine tokens/s",
                bench.add_throughput_arguments,
                bench.cmd_bench_throughput,
            ),
        },
    ),
    "train": Command("run one training stage of a recipe", train.add_arguments, train.cmd_train),
    "eval": Command(
        "evaluate a saved model on held-out dialogues", evaluate.add_arguments, evaluate.cmd_eval
    ),
    "data": Command("write dialogue JSONL files", data.add_arguments, data.cmd_data),
}


def _add_commands(parser: argparse.ArgumentParser, dest: str, table: dict) -> None:
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, entry in table.items():
        child = sub.add_parser(name, help=entry.help)
        if isinstance(entry, Group):
            _add_commands(child, name, entry.commands)
        else:
            entry.add_arguments(child)


def build_parser() -> argparse.ArgumentParser:
    from rxt import __version__

    parser = argparse.ArgumentParser(
        prog="rxt", description="Reactive Transformer: stateful, event-driven language models."
    )
    parser.add_argument("--version", action="version", version=f"rxt {__version__}")
    _add_commands(parser, "command", COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    kwargs = vars(build_parser().parse_args(argv))
    name = kwargs.pop("command")
    entry = COMMANDS[name]
    if isinstance(entry, Group):  # its sub-command's name is parsed under the group's name
        entry = entry.commands[kwargs.pop(name)]
    try:
        return entry.run(**kwargs)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # one clear line, no traceback
        print(f"rxt {name}: error: {exc}", file=sys.stderr)
        return 2
