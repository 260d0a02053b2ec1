"""Throughput and time to first token of ``rxt serve``, measured through HTTP.

    python benchmarks/serve_http.py --preset small --json runs/bench/serve_http.json

Builds a model (a random-weight ``--preset``, or ``--model-dir``), saves it, starts the real
server as a child process (``python -m rxt.cli serve``, SQLite store in a temporary directory,
``OMP_NUM_THREADS=1``) and measures it as OpenAI clients see it, with an asyncio HTTP client
(httpx) in this process:

- **throughput**: ``c`` clients at once (``--concurrency``), each streaming ``--client-turns``
  turns of its own conversation (``/v1/chat/completions``, ``stream: true``, one message per
  turn with the ``conversation_id`` extension), the next turn sent as soon as the previous
  answer ended. Generated tokens (counted from the streamed ``usage``) over the wall time of
  the run. ``--repeats`` rounds, each running every concurrency in turn, so that a slow spell
  of a shared machine hits all of them; medians, the ratio to the first concurrency, and the
  median of that ratio taken within each round. Also the server's CPU time per token (all
  threads; the event-loop thread alone) and the client's, read from ``/proc``.
- **time to first token vs turn**: conversations of ``--turns`` turns, from sending a request
  to receiving its first content delta, per turn. ``chat``: ``/v1/chat/completions`` with the
  whole transcript resent every turn (what an ordinary OpenAI client does; the server finds
  the stored prefix by its hash); ``responses``: ``/v1/responses`` with
  ``previous_response_id``; ``chat-id`` (not run by default): chat with ``conversation_id``.
  The next turn is sent ``--think-times`` seconds after the previous answer ended. With a think
  time of 0 every turn after the first also waits for the previous turn's memory update and
  state commit, which turn 1 never does. Medians over the first and the last ``--window``
  turns of ``--repeats`` conversations each (rounds interleave the cases), and their ratio.
  ``headers`` is the time to the response headers, sent once the turn has been handed to
  the engine (state loaded, lock taken).

Answers are greedy (temperature 0) with ``max_tokens = --answer-tokens``. A random model's
answers would stop at EOS or consist of ids that decode to no text (the demo tokenizer has
~450 tokens, the ``small`` model 4,096 outputs), so for a ``--preset`` model the LM-head rows
of every id that does not decode to printable text on its own are zeroed (``--head``; a
``--model-dir`` model is left as it is by default): every answer then runs to ``max_tokens``
and every token streams text. No shape and no amount of work changes.

Server and client share this machine's CPUs: the figures are of the pair. ``server_means``
are the server's own histograms (``/metrics``) over each part. A figure-printing benchmark,
not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from rxt.bench.common import load_or_build
from rxt.data.synthetic import synthetic_corpus
from rxt.results import environment, write_json

MODEL_NAME = "bench"
CONVERSATION_HEADER = "x-rxt-conversation-id"
APIS = ("chat", "responses", "chat-id")
# Server-side histograms read from /metrics before and after each part (mean per turn).
SERVER_HISTOGRAMS = {
    "ttft_s": "rxt_time_to_first_token_seconds",
    "memory_update_s": "rxt_memory_update_latency_seconds",
    "state_commit_s": "rxt_state_commit_seconds",
}


# ---------------------------------------------------------------------------- the model
def printable_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids that decode, alone, to non-empty text without a replacement character."""
    allowed = []
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text:
            allowed.append(i)
    return allowed


def confine_head(model) -> int:
    """Zero the LM-head rows of every id outside :func:`printable_ids`: with random weights the
    others' logits are spread around 0, so greedy decoding never picks a zeroed one (EOS, other
    special tokens, lone bytes, ids beyond the tokenizer). Returns how many ids remain."""
    vocab = model.config.vocab_size
    allowed = printable_ids(model.tokenizer, vocab)
    mask = torch.ones(vocab, dtype=torch.bool)
    mask[allowed] = False
    if model.config.tie_embeddings:
        print("note: tied embeddings: the zeroed rows are input embeddings too", file=sys.stderr)
    with torch.no_grad():
        model.lm_head.weight[mask.to(model.lm_head.weight.device)] = 0.0
    return len(allowed)


def make_queries(tokenizer, count: int, tokens: int, seed: int) -> list[str]:
    """``count`` distinct queries of about ``tokens`` tokens (whole words of demo sentences)."""
    rng = random.Random(seed)
    sentences = synthetic_corpus(max(200, count * 8), seed=seed + 1)
    queries = []
    for _ in range(count):
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words))) < tokens:
            words += rng.choice(sentences).split()
        while len(words) > 1 and len(tokenizer.encode(" ".join(words))) > tokens:
            words.pop()
        queries.append(" ".join(words))
    return queries


# ---------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m rxt.cli serve MODEL_DIR`` as a child process on a free loopback port."""

    def __init__(self, model_dir: Path, workdir: Path, extra: list[str], profile: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        args = [sys.executable]
        if profile:  # cProfile of the main thread (event loop, HTTP, SSE); written at exit
            args += ["-m", "cProfile", "-o", str(Path(profile).resolve())]
        args += ["-m", "rxt.cli", "serve", str(model_dir), "--port", str(self.port)]
        args += ["--store", str(workdir / "state.db"), "--model-name", MODEL_NAME]
        args += ["--log-level", "warning", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=self._log)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.url} not healthy after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


def read_histograms(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of :data:`SERVER_HISTOGRAMS` from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return {
        key: (values.get(name + "_sum", 0.0), values.get(name + "_count", 0.0))
        for key, name in SERVER_HISTOGRAMS.items()
    }


# ---------------------------------------------------------------------------- streaming calls
class StreamError(RuntimeError):
    pass


async def _events(response: httpx.Response):
    """The JSON payloads of an SSE response (``[DONE]`` ends it)."""
    if response.status_code != 200:
        body = (await response.aread()).decode(errors="replace")
        raise StreamError(f"HTTP {response.status_code}: {body[:500]}")
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _chat_event(event: dict, out: dict[str, Any]) -> str | None:
    """Record a chat-completion chunk in ``out``; return its text delta."""
    if "error" in event:
        raise StreamError(f"error event: {event['error']}")
    text = None
    for choice in event.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") or text
        if choice.get("finish_reason"):
            out["finish_reason"] = choice["finish_reason"]
    if event.get("usage"):
        out["completion_tokens"] = event["usage"]["completion_tokens"]
        out["prompt_tokens"] = event["usage"]["prompt_tokens"]
    return text


def _response_event(event: dict, out: dict[str, Any]) -> str | None:
    """Record a ``/v1/responses`` stream event in ``out``; return its text delta."""
    kind = event.get("type")
    if kind == "error":
        raise StreamError(f"error event: {event}")
    if kind in ("response.completed", "response.incomplete"):
        final = event["response"]
        out["response_id"] = final["id"]
        usage = final.get("usage") or {}
        out["completion_tokens"] = usage.get("output_tokens")
        out["prompt_tokens"] = usage.get("input_tokens")
        out["finish_reason"] = final.get("status")
    return event.get("delta") if kind == "response.output_text.delta" else None


async def _stream(client: httpx.AsyncClient, path: str, body: dict, on_event) -> dict[str, Any]:
    """One streamed call: caller-side timings, text, token counts, conversation."""
    out: dict[str, Any] = {"ttft_s": None, "completion_tokens": None, "prompt_tokens": None}
    pieces: list[str] = []
    start = time.perf_counter()
    async with client.stream("POST", path, json=body) as response:
        out["headers_s"] = time.perf_counter() - start
        out["conversation_id"] = response.headers.get(CONVERSATION_HEADER)
        async for event in _events(response):
            text = on_event(event, out)
            if text:
                if out["ttft_s"] is None:
                    out["ttft_s"] = time.perf_counter() - start
                pieces.append(text)
    out["reply_s"] = time.perf_counter() - start
    out["text"] = "".join(pieces)
    return out


async def stream_chat(client: httpx.AsyncClient, body: dict) -> dict[str, Any]:
    """One streamed chat completion (see :func:`_stream`)."""
    return await _stream(client, "/v1/chat/completions", body, _chat_event)


async def stream_response(client: httpx.AsyncClient, body: dict) -> dict[str, Any]:
    """One streamed ``/v1/responses`` call, as :func:`stream_chat`; adds ``response_id``."""
    return await _stream(client, "/v1/responses", body, _response_event)


def chat_body(messages: list[dict], answer_tokens: int, **extra: Any) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": answer_tokens,
        **extra,
    }


# ---------------------------------------------------------------------------- throughput
async def throughput_run(
    client: httpx.AsyncClient,
    clients: int,
    turns: int,
    answer_tokens: int,
    queries,
    tag: str,
    pid: int | None = None,
) -> dict[str, Any]:
    """``clients`` conversations at once, ``turns`` turns each, back to back."""
    ttfts: list[float] = []

    async def one(index: int) -> int:
        cid = f"{tag}-{index}"
        tokens = 0
        for turn in range(turns):
            query = queries[(index * turns + turn) % len(queries)]
            body = chat_body([{"role": "user", "content": query}], answer_tokens)
            result = await stream_chat(client, {**body, "conversation_id": cid})
            if result["completion_tokens"] is None:
                raise StreamError("no usage chunk in the stream")
            tokens += result["completion_tokens"]
            if result["ttft_s"] is not None:
                ttfts.append(result["ttft_s"])
        return tokens

    cpu_before = thread_cpu(pid) if pid else {}
    client_cpu = time.process_time()
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    cpu = cpu_delta(pid, cpu_before, thread_cpu(pid)) if pid else {}
    tokens = sum(counts)
    return {
        **cpu,
        "client_cpu_s": client_cpu,
        "tokens": tokens,
        "expected_tokens": clients * turns * answer_tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "median_ttft_s": statistics.median(ttfts) if ttfts else None,
    }


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid`` (Linux; else empty)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_delta(pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, Any]:
    """Server CPU seconds over a run: all threads, the event loop (main) thread, and the three
    busiest other threads (decoder, memory updater, store workers: unnamed in Python 3.11)."""
    if not after:
        return {}
    delta = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    others = sorted((v for tid, v in delta.items() if tid != pid), reverse=True)
    return {
        "server_cpu_s": sum(delta.values()),
        "server_loop_cpu_s": delta.get(pid, 0.0),
        "server_top_threads_cpu_s": others[:3],
    }


def _accumulate(total: dict, before: dict, after: dict) -> None:
    for key in SERVER_HISTOGRAMS:
        old = total.get(key, (0.0, 0.0))
        total[key] = (
            old[0] + after[key][0] - before[key][0],
            old[1] + after[key][1] - before[key][1],
        )


def _means(total: dict) -> dict[str, float | None]:
    return {key: (s / n if n else None) for key, (s, n) in total.items()}


def _cpu_per_token(runs: list[dict]) -> dict[str, float]:
    """Median CPU milliseconds per generated token: server (all threads, event loop), client."""
    out = {}
    for key in ("server_cpu_s", "server_loop_cpu_s", "client_cpu_s"):
        if all(key in run for run in runs):
            name = key.removesuffix("_s").replace("_cpu", "_cpu_ms_per_token")
            out[name] = statistics.median(1e3 * run[key] / run["tokens"] for run in runs)
    return out


async def run_throughput(server: Server, args, queries, log) -> tuple[list[dict], dict]:
    """Rounds of every concurrency in turn (a slow spell of a shared machine hits them all)."""
    url, pid = server.url, server.process.pid
    records = []
    hist: dict[int, dict] = {c: {} for c in args.concurrency}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8, max_keepalive_connections=64)
    timeout = httpx.Timeout(300.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        warm = min(4, max(args.concurrency))
        await throughput_run(client, warm, 2, args.answer_tokens, queries, "warmup")
        for r in range(args.repeats):
            line = []
            for clients in args.concurrency:
                tag = f"tp-c{clients}-r{r}"
                before = await asyncio.to_thread(read_histograms, url)
                run = await throughput_run(
                    client, clients, args.client_turns, args.answer_tokens, queries, tag, pid
                )
                after = await asyncio.to_thread(read_histograms, url)
                _accumulate(hist[clients], before, after)
                records.append({"part": "throughput", "concurrency": clients, "repeat": r, **run})
                line.append(f"c={clients} {run['tokens_per_s']:.0f}")
            log(f"  throughput round {r + 1}/{args.repeats}: {', '.join(line)} tokens/s")
    by_c: dict[int, dict] = {}
    base_c = args.concurrency[0]
    base_runs = {rec["repeat"]: rec for rec in records if rec["concurrency"] == base_c}
    for clients in args.concurrency:
        runs = [rec for rec in records if rec["concurrency"] == clients]
        ttfts = [rec["median_ttft_s"] for rec in runs if rec["median_ttft_s"] is not None]
        by_c[clients] = {
            "tokens_per_s": statistics.median(rec["tokens_per_s"] for rec in runs),
            "median_ttft_s": statistics.median(ttfts) if ttfts else None,
            # the ratio within each round, then the median: robust to a drifting load
            "ratio_per_round": statistics.median(
                rec["tokens_per_s"] / base_runs[rec["repeat"]]["tokens_per_s"] for rec in runs
            ),
            "short_answers": sum(rec["expected_tokens"] - rec["tokens"] for rec in runs),
            "server_means": _means(hist[clients]),
            **_cpu_per_token(runs),
        }
    base = by_c[base_c]["tokens_per_s"]
    for row in by_c.values():
        row["ratio"] = row["tokens_per_s"] / base
    summary: dict[str, Any] = {"by_concurrency": by_c}
    if base_c == 1 and 16 in by_c:
        ratio = by_c[16]["ratio"]
        summary["target_16_vs_1"] = {
            "required": 5.0,
            "measured": ratio,
            "measured_per_round": by_c[16]["ratio_per_round"],
            "met": ratio >= 5.0,
        }
    return records, summary


# ---------------------------------------------------------------------------- ttft vs turn
async def conversation(
    client: httpx.AsyncClient, api: str, args, queries, think: float, tag: str
) -> list[dict]:
    """One conversation of ``args.turns`` turns through ``api``; a record per turn."""
    records = []
    history: list[dict] = []
    previous: str | None = None
    for turn in range(1, args.turns + 1):
        query = queries[(turn - 1) % len(queries)]
        if api == "responses":
            body: dict[str, Any] = {
                "model": MODEL_NAME,
                "input": query,
                "stream": True,
                "temperature": 0,
                "max_output_tokens": args.answer_tokens,
            }
            if previous:
                body["previous_response_id"] = previous
            result = await stream_response(client, body)
            previous = result.get("response_id")
            if previous is None:
                raise StreamError("no response.completed event")
        elif api == "chat":
            history.append({"role": "user", "content": query})
            result = await stream_chat(client, chat_body(history, args.answer_tokens))
            history.append({"role": "assistant", "content": result["text"]})
        else:  # chat-id
            body = chat_body([{"role": "user", "content": query}], args.answer_tokens)
            result = await stream_chat(client, {**body, "conversation_id": tag})
        records.append(
            {
                "part": "ttft",
                "api": api,
                "think_s": think,
                "turn": turn,
                "ttft_s": result["ttft_s"],
                "headers_s": result["headers_s"],
                "reply_s": result["reply_s"],
                "prompt_tokens": result["prompt_tokens"],
                "completion_tokens": result["completion_tokens"],
                "conversation_id": result["conversation_id"],
            }
        )
        if think > 0:
            await asyncio.sleep(think)
    return records


def theil_sen(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the Theil-Sen line: the median of pairwise slopes, robust to the
    occasional slow turn of a shared machine that would tilt a least-squares fit."""
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if x2 != x1
    ]
    slope = statistics.median(slopes) if slopes else 0.0
    return statistics.median(y - slope * x for x, y in points), slope


def _median(values) -> float | None:
    """The median of the values that are not None (a turn that streamed no text has no TTFT)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _window(values_by_turn: dict[int, list], turns: list[int]) -> float | None:
    return _median(v for t in turns for v in values_by_turn[t])


async def run_ttft(server: Server, args, queries, log) -> tuple[list[dict], dict]:
    """Rounds of one conversation per (think time, API), interleaved like the throughput's."""
    url = server.url
    records: list[dict] = []
    cases: dict[str, dict] = {}
    w = min(args.window, max(1, args.turns // 2))
    first, last = list(range(1, w + 1)), list(range(args.turns - w + 1, args.turns + 1))
    plan = [(think, api) for think in args.think_times for api in args.apis]
    runs: dict[tuple, list[list[dict]]] = {case: [] for case in plan}
    hist: dict[tuple, dict] = {case: {} for case in plan}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        # Every conversation opens with a query of its own, so no chat transcript can continue
        # another conversation's prefix (the check below would report it).
        opened = 0

        def rotated() -> list[str]:
            nonlocal opened
            opened += 1
            k = (opened - 1) % len(queries)
            return queries[k:] + queries[:k]

        short = argparse.Namespace(**{**vars(args), "turns": 3})
        for api in args.apis:  # warm-up: a short conversation of each kind
            await conversation(client, api, short, rotated(), 0.0, f"warmup-{api}")
        for r in range(args.repeats):
            for think, api in plan:
                before = await asyncio.to_thread(read_histograms, url)
                tag = f"ttft-{r}-{api}-{think}"
                conv = await conversation(client, api, args, rotated(), think, tag)
                after = await asyncio.to_thread(read_histograms, url)
                _accumulate(hist[(think, api)], before, after)
                for rec in conv:
                    rec["repeat"] = r
                runs[(think, api)].append(conv)
                records += conv
            log(f"  ttft round {r + 1}/{args.repeats} done")
    for think, api in plan:
        convs = runs[(think, api)]
        by_turn: dict[int, list[float]] = {t: [] for t in range(1, args.turns + 1)}
        headers_by_turn: dict[int, list[float]] = {t: [] for t in by_turn}
        for conv in convs:
            for rec in conv:
                by_turn[rec["turn"]].append(rec["ttft_s"])
                headers_by_turn[rec["turn"]].append(rec["headers_s"])
        # One conversation per repeat: the chat transcript's prefix was found every turn (a
        # miss would start a new conversation and replay the whole transcript).
        ids_per_run = [len({rec["conversation_id"] for rec in conv}) for conv in convs]
        row = {
            "api": api,
            "think_s": think,
            "first_turns": first,
            "last_turns": last,
            "ttft_first_s": _window(by_turn, first),
            "ttft_last_s": _window(by_turn, last),
            "headers_first_s": _window(headers_by_turn, first),
            "headers_last_s": _window(headers_by_turn, last),
            "ttft_turn1_s": _median(by_turn[1]),
            "ttft_lastturn_s": _median(by_turn[args.turns]),
            "median_ttft_by_turn_s": {t: _median(v) for t, v in by_turn.items()},
            "turns_without_text": sum(v is None for values in by_turn.values() for v in values),
            "median_reply_s": statistics.median(rec["reply_s"] for conv in convs for rec in conv),
            "one_conversation_per_repeat": all(n == 1 for n in ids_per_run),
            "short_answers": sum(
                args.answer_tokens - (rec["completion_tokens"] or 0)
                for conv in convs
                for rec in conv
            ),
            "server_means": _means(hist[(think, api)]),
        }
        if row["ttft_first_s"] is None or row["ttft_last_s"] is None:
            raise StreamError(
                f"{api}: no text streamed in the first or the last turns "
                "(a random-weight model? try --head confine)"
            )
        row["ratio"] = row["ttft_last_s"] / row["ttft_first_s"]
        # The trend over all turns (per-turn medians): how TTFT grows, if at all, turn by turn.
        points = [(t, m) for t, m in row["median_ttft_by_turn_s"].items() if m is not None]
        intercept, slope = theil_sen(points)
        row["trend_slope_ms_per_turn"] = slope * 1e3
        row["trend_ratio"] = (intercept + slope * args.turns) / (intercept + slope)
        cases[f"{api}@think={think}"] = row
        log(
            f"  ttft {api:<9} think {think * 1e3:4.0f} ms: turns {first[0]}-{first[-1]} "
            f"{row['ttft_first_s'] * 1e3:6.1f} ms, turns {last[0]}-{last[-1]} "
            f"{row['ttft_last_s'] * 1e3:6.1f} ms, ratio {row['ratio']:.2f}"
            + ("" if row["one_conversation_per_repeat"] else "  (PREFIX MISSES)")
        )
    summary: dict[str, Any] = {"cases": cases}
    # The target is about memory, not queueing: judged on the cases with a think time (with
    # none, every turn but the first also waits for the previous turn's update and commit).
    judged = [row for row in cases.values() if row["think_s"] > 0] or list(cases.values())
    worst = max(row["ratio"] for row in judged)
    summary["target_last_vs_first"] = {
        "required": 1.2,
        "judged": [f"{row['api']}@think={row['think_s']}" for row in judged],
        "worst": worst,
        "worst_trend_ratio": max(row["trend_ratio"] for row in judged),
        "met": worst <= 1.2,
    }
    return records, summary


# ---------------------------------------------------------------------------- main
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def print_tables(summary: dict, args) -> None:
    if "throughput" in summary:
        print(
            f"\nthroughput: each client {args.client_turns} turns x {args.answer_tokens} tokens, "
            f"median of {args.repeats} rounds"
        )
        print(
            "| clients | tokens/s | x first | x first (per round) | client ttft "
            "| server ttft (mean) | server CPU / token (loop) | client CPU / token |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for c, row in summary["throughput"]["by_concurrency"].items():
            cpu = row.get("server_cpu_ms_per_token")
            loop = row.get("server_loop_cpu_ms_per_token")
            cpu_text = "-" if cpu is None else f"{cpu:.2f} ms ({loop:.2f} ms)"
            client = row.get("client_cpu_ms_per_token")
            client_text = "-" if client is None else f"{client:.2f} ms"
            print(
                f"| {c} | {row['tokens_per_s']:,.0f} | {row['ratio']:.2f} "
                f"| {row['ratio_per_round']:.2f} | {_ms(row['median_ttft_s'])} ms "
                f"| {_ms(row['server_means']['ttft_s'])} ms | {cpu_text} | {client_text} |"
            )
    if "ttft" in summary:
        print(
            f"\ntime to first token (ms), medians over turns {args.window} first / last of "
            f"{args.turns}, {args.repeats} conversations each"
        )
        print(
            "| api | think | first turns | last turns | last / first | trend: ms/turn, "
            f"turn {args.turns} / turn 1 | headers first / last |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in summary["ttft"]["cases"].values():
            print(
                f"| {row['api']} | {row['think_s'] * 1e3:.0f} ms "
                f"| {_ms(row['ttft_first_s'])} | {_ms(row['ttft_last_s'])} "
                f"| {row['ratio']:.2f} | {row['trend_slope_ms_per_turn']:+.3f}, "
                f"{row['trend_ratio']:.2f} | {_ms(row['headers_first_s'])} / "
                f"{_ms(row['headers_last_s'])} |"
            )


def print_targets(summary: dict) -> None:
    """The issue's two targets, when this run measured them."""
    tp = summary.get("throughput", {}).get("target_16_vs_1")
    if tp:
        verdict = "met" if tp["met"] else "MISSED"
        print(
            f"target: 16 clients >= 5x one: {tp['measured']:.2f}x "
            f"({tp['measured_per_round']:.2f}x within rounds), {verdict}"
        )
    tt = summary.get("ttft", {}).get("target_last_vs_first")
    if tt:
        verdict = "met" if tt["met"] else "MISSED"
        print(
            f"target: ttft last turns <= 1.2x first: worst {tt['worst']:.2f}x "
            f"(trend {tt['worst_trend_ratio']:.2f}x) over {', '.join(tt['judged'])}, {verdict}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model-dir", default=None, help="a saved model instead of a preset")
    parser.add_argument(
        "--head",
        choices=["auto", "confine", "keep"],
        default="auto",
        help="zero the LM-head rows of ids that stream no text (auto: for --preset models)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", default=["throughput", "ttft"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--client-turns", type=int, default=4, help="turns per throughput client")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=32, help="turns of the ttft conversation")
    parser.add_argument("--window", type=int, default=4, help="first/last turns compared")
    parser.add_argument("--apis", nargs="+", default=["chat", "responses"], choices=APIS)
    parser.add_argument("--think-times", type=float, nargs="+", default=[0.05, 0.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=None, help="passed to the server")
    parser.add_argument("--server-profile", default=None, help="cProfile the server to FILE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    unknown = set(args.parts) - {"throughput", "ttft"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)} (throughput, ttft)")
    for name in ("client_turns", "answer_tokens", "query_tokens", "turns", "window", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.concurrency) < 1 or min(args.think_times) < 0:
        parser.error("--concurrency must be >= 1 and --think-times >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    model = load_or_build(args.model_dir, args.preset, args.seed, "cpu")
    if args.query_tokens + 3 + args.answer_tokens > model.config.max_seq_len:
        sys.exit("--query-tokens + 3 + --answer-tokens exceed the model's max_seq_len")
    head = args.head if args.head != "auto" else ("keep" if args.model_dir else "confine")
    allowed = confine_head(model) if head == "confine" else None
    # Separate pools: no ttft transcript can start like a throughput conversation.
    queries = {
        part: make_queries(model.tokenizer, 64, args.query_tokens, args.seed + i)
        for i, part in enumerate(("throughput", "ttft"))
    }
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings["head"], settings["allowed_output_ids"] = head, allowed
    env = {
        **environment("cpu"),
        "cpu": cpu_name(),
        "preset": None if args.model_dir else args.preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "server_omp_threads": 1,
        "httpx": httpx.__version__,
    }
    summary: dict[str, Any] = {}
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rxt-serve-bench-") as tmp:
        workdir = Path(tmp)
        model.save_pretrained(workdir / "model")
        del model
        extra = []
        if args.max_batch_size:
            extra += ["--max-batch-size", str(args.max_batch_size)]
        server = Server(workdir / "model", workdir, extra, args.server_profile)
        try:
            server.wait_healthy()
            print(f"server {server.url} up after {time.perf_counter() - started:.1f} s")
            parts = {"throughput": run_throughput, "ttft": run_ttft}
            for part in args.parts:
                t0 = time.perf_counter()
                recs, summary[part] = asyncio.run(parts[part](server, args, queries[part], print))
                summary[part]["wall_s"] = time.perf_counter() - t0
                records += recs
        except BaseException:
            print(f"server log:\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            server.stop()
    env["loadavg_before"] = load_before
    env["loadavg_after"] = os.getloadavg()
    summary["wall_s"] = time.perf_counter() - started
    print_tables(summary, args)
    print()
    print_targets(summary)
    walls = ", ".join(f"{part} {summary[part]['wall_s']:.0f} s" for part in args.parts)
    load = env["loadavg_after"][0]
    print(f"\ntotal {summary['wall_s']:.0f} s ({walls}); load average {load:.1f}")
    if args.json:
        write_json(
            args.json,
            {"records": records, "summary": summary, "settings": settings, "environment": env},
        )


if __name__ == "__main__":
    main()
