"""`rxt chat`: talk to a model in the terminal, one event per line.

Each line typed is one interaction (paper §4): the answer streams from the decoder as it is
generated, then the memory update runs on the engine's worker thread and its status is shown.
Only the fixed-size STM carries the conversation from turn to turn, so ``/save`` and ``/load``
suspend and resume a whole conversation.

Output stays line-oriented when piped: answers follow ``rxt> ``, memory status lines are
``[memory: ...]``, errors go to stderr, and no ``you> `` prompt is printed unless stdin is a TTY.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rxt.cli.common import set_threads
from rxt.engine import EngineError, StateError

if TYPE_CHECKING:
    from rxt.engine import Conversation, Engine, SamplingParams

HELP = """\
commands:
  /reset       forget the conversation (back to the initial memory)
  /save FILE   write the memory (STM) to FILE
  /load FILE   replace the memory with one /save wrote for this model
  /help        show this help
  /quit        leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C while an answer streams stops it; the memory still takes in what was said."""

# SamplingParams fields exposed as options: flag, type, default, help.
_SAMPLING = [
    ("--max-new-tokens", int, 128, "longest answer, capped to fit a turn"),
    ("--temperature", float, 0.0, "0 = greedy"),
    ("--top-k", int, 0, "0 = off"),
    ("--top-p", float, 1.0, "1 = off"),
    ("--repetition-penalty", float, 1.0, "1 = off"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rxt chat`` options."""
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model directory with a tokenizer.json"
    )
    parser.add_argument("--system", metavar="TEXT", help="system prompt (memory turn 0)")
    parser.add_argument("--seed", type=int, help="seed of the initial memory and sampling")
    for flag, kind, default, note in _SAMPLING:
        parser.add_argument(flag, type=kind, default=default, help=f"{note} (default {default})")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _build_engine(
    model_dir: str, sampling: SamplingParams, threads: int | None, device: str
) -> Engine:
    """Model, tokenizer and engine; a user error raises ValueError/OSError with one line."""
    from rxt.engine import Engine
    from rxt.engine.load import load_text_model

    set_threads(threads)
    return Engine(load_text_model(model_dir, device), default_sampling=sampling)


def _one_line(message: object) -> str:
    # Some messages (Hugging Face Hub errors) span lines; an error stays one line of stderr.
    return " ".join(str(message).split("\n"))


class ChatSession:
    """One conversation driven by lines of text. Only the calling thread writes output."""

    def __init__(
        self,
        engine: Engine,
        out: TextIO,
        err: TextIO,
        *,
        system: str | None = None,
        seed: int | None = None,
    ):
        self.engine, self.out, self.err = engine, out, err
        self.system, self.seed = system, seed  # every conversation's (also after /reset)
        # Update events arrive on the worker thread and are printed by the main thread, so a
        # status line can never land inside a streamed answer.
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.open_updates = 0  # "started" events printed without their "finished"/"failed"
        self.conv = self._new_conversation()

    def _new_conversation(self, state: bytes | None = None) -> Conversation:
        return self.engine.conversation(
            self.system, seed=self.seed, state=state, on_update=self.events.put
        )

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()  # every piece, as it is generated

    def error(self, message: str) -> None:
        self.err.write(f"error: {_one_line(message)}\n")
        self.err.flush()

    def show_updates(self) -> None:
        """Print update events until every update of the conversation is committed.

        Waiting costs nothing: the engine starts a conversation's next turn only after its
        previous update committed. It keeps status lines before the next prompt, and piped
        output deterministic."""
        while self.open_updates or self.conv.updating or not self.events.empty():
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue  # e.g. a turn cancelled before it started: no event will come
            if event.kind == "started":
                self.open_updates += 1
                self.say("[memory: updating...]")
                continue
            self.open_updates -= 1
            if event.kind == "finished":
                self.say(f"[memory: updated in {event.timing.duration_s * 1e3:.1f} ms]")
            else:
                self.say(f"[memory: update failed: {event.error}]")

    def ask(self, text: str) -> None:
        limit = self.engine.model.config.max_seq_len
        room = limit - len(self.engine.tokenizer.encode_query(text))
        if room < 1:
            return self.error(f"query too long: the model holds {limit} tokens per turn")
        # Cap the answer to what still fits in the turn rather than refuse the query.
        max_new = min(room, self.engine.default_sampling.max_new_tokens)
        try:
            stream = self.conv.send(text, max_new_tokens=max_new)
        except EngineError:
            return self.error("the last memory update failed; /reset or /load FILE to go on")
        self.say("rxt> ", end="")
        try:
            for piece in stream:
                self.say(piece.text, end="")
        except KeyboardInterrupt:
            stream.cancel()  # the memory is still updated, with the answer as far as it went
            stream.result()
            self.say(" [cancelled]", end="")
        except EngineError as exc:
            self.say()
            return self.error(str(exc))
        self.say()

    def command(self, line: str) -> bool:
        """Run a /command; False to end the session."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.reset()
        elif name in ("/save", "/load") and not arg:
            self.error(f"usage: {name} FILE")
        elif name == "/save":
            self.save(Path(arg).expanduser())
        elif name == "/load":
            self.load(Path(arg).expanduser())
        else:
            self.error(f"unknown command {name} (/help lists them)")
        return True

    def reset(self) -> None:
        self.conv.reset()  # also recovers from a failed memory update
        self.say("[memory: reset]")

    def save(self, path: Path) -> None:
        try:
            data = self.conv.export_state()
            # Temp file + rename in the same directory: a crash never leaves half a state.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        except (OSError, EngineError) as exc:
            return self.error(f"cannot save {path}: {exc}")
        self.say(f"[memory: saved to {path}]")

    def load(self, path: Path) -> None:
        try:
            self.conv.load_state(path.read_bytes())
        except (OSError, StateError) as exc:  # the current memory is untouched
            return self.error(f"cannot load {path}: {exc}")
        self.say(f"[memory: loaded {path}, {self.conv.turns} turns]")

    def run(self, stdin: TextIO) -> None:
        interactive = stdin.isatty()  # a prompt only for a person; piped output stays clean
        use_input = interactive and stdin is sys.stdin and self.out is sys.stdout
        if use_input:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        while True:
            try:
                self.show_updates()  # the system prompt's, or the last turn's
                if use_input:
                    line = input("you> ")  # raises EOFError at Ctrl-D
                else:
                    if interactive:
                        self.say("you> ", end="")
                    line = stdin.readline()
                    if not line:  # EOF ("" — an empty line is "\n")
                        break
                line = line.strip()
                if line.startswith("/"):
                    if not self.command(line):
                        return
                elif line:
                    self.ask(line)
            except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C outside an answer: leave
                break
        if interactive:
            self.say()  # end the prompt's line


def run_chat(
    model_dir: str,
    *,
    system: str | None = None,
    seed: int | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    threads: int | None = None,
    device: str = "cpu",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Interactive chat with the model in ``model_dir``; 0 when the user leaves, 2 on a user
    error (printed as one line). Streams default to ``sys.*`` at call time, so captured streams
    (pytest's capsys) are honoured."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        from rxt.engine import SamplingParams

        # Checked before the load, so a typo costs no wait.
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        engine = _build_engine(model_dir, sampling, threads, device)
    except (ValueError, OSError) as exc:
        stderr.write(f"rxt chat: error: {_one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading
        return 130
    try:
        session = ChatSession(engine, stdout, stderr, system=system, seed=seed)
    except ValueError as exc:  # e.g. a system prompt longer than a turn
        engine.close()
        stderr.write(f"rxt chat: error: {_one_line(exc)}\n")
        return 2
    try:
        session.run(stdin)
    finally:
        engine.close()  # finishes the last memory update
    return 0
