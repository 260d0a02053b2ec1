"""Multi-turn recall through the OpenAI API vs. the engine called directly.

    python benchmarks/serve_recall.py runs/demo/rxt --data runs/demo/data/probes-test.jsonl

Serves MODEL_DIR in this process (uvicorn on a loopback port, SQLite store in a temporary
directory) and plays every dialogue of ``--data`` through ``/v1/chat/completions`` the way an
ordinary client does: the whole transcript resent each turn, the server's own replies appended
(free-running, greedy), ``--concurrency`` dialogues at once so the engine batches them. Then the
same dialogues run on ``rxt.engine`` directly from the same STM_0 (each conversation's seed is in
the store). Prints the recall of the probe turns both ways, by ``rxt eval``'s rule
(:func:`rxt.eval.recall.exact_match`: the stripped reply equals the value exactly, case and
punctuation included), and how many replies are identical. Free-running recall is stricter
than ``rxt eval``'s teacher-forced recall: the model reads its own earlier replies, not the
gold ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import torch
import uvicorn

from rxt.engine import Engine
from rxt.engine.state import stm_to_bytes
from rxt.eval.recall import exact_match
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.serve.app import create_app
from rxt.serve.auth import DEV_OWNER
from rxt.serve.settings import ServerSettings

HEADER = "X-RxT-Conversation-Id"


def recall(dialogues: list[dict], replies: list[list[str]]) -> tuple[int, int]:
    hits = total = 0
    for dialogue, said in zip(dialogues, replies, strict=True):
        for probe in dialogue["probes"]:
            total += 1
            hits += exact_match(said[probe["turn"]], probe["answer"])
    return hits, total


async def play(base_url: str, dialogues: list[dict], args) -> tuple[list[list[str]], list[str]]:
    client = openai.AsyncOpenAI(
        api_key="unused",
        base_url=base_url + "/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency)),
    )
    gate = asyncio.Semaphore(args.concurrency)
    replies: list[list[str]] = [[] for _ in dialogues]
    conversations = [""] * len(dialogues)

    async def one(i: int) -> None:
        async with gate:
            messages: list[dict] = []
            for turn in dialogues[i]["turns"]:
                messages.append({"role": "user", "content": turn["query"]})
                raw = await client.chat.completions.with_raw_response.create(
                    model="rxt", messages=messages, temperature=0, max_tokens=args.max_tokens
                )
                text = raw.parse().choices[0].message.content
                conversations[i] = raw.headers[HEADER]
                replies[i].append(text)
                messages.append({"role": "assistant", "content": text})

    await asyncio.gather(*(one(i) for i in range(len(dialogues))))
    await client.close()
    return replies, conversations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl")
    parser.add_argument("--limit", type=int, default=100, help="first N dialogues")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = Path(args.data).read_text().splitlines()
    dialogues = [json.loads(line) for line in lines if line.strip()][: args.limit]
    model = ReactiveTransformer.from_pretrained(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServerSettings(model_name="rxt", store_url=str(Path(tmp) / "state.db"))
        app = create_app(model, settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        started = time.perf_counter()
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        api_replies, conversations = asyncio.run(play(base_url, dialogues, args))
        api_s = time.perf_counter() - started
        while app.state.service.locks:  # the last turns' states are still being stored
            time.sleep(0.05)
        store = app.state.service.store
        seeds = [store.get_conversation(DEV_OWNER, c).metadata["stm_seed"] for c in conversations]
        server.should_exit = True
        thread.join()
    engine_replies = []
    with Engine(model) as engine:
        for dialogue, seed in zip(dialogues, seeds, strict=True):
            stm = model.initial_stm(1, generator=torch.Generator().manual_seed(seed))
            state = stm_to_bytes(stm, fingerprint=engine.fingerprint, metadata={"turns": "0"})
            conv = engine.conversation(state=state)
            said = [
                conv.ask(turn["query"], temperature=0, max_new_tokens=args.max_tokens).text
                for turn in dialogue["turns"]
            ]
            engine_replies.append(said)
    api_hits, probes = recall(dialogues, api_replies)
    engine_hits, _ = recall(dialogues, engine_replies)
    pairs = [
        (a, e)
        for d_a, d_e in zip(api_replies, engine_replies, strict=True)
        for a, e in zip(d_a, d_e, strict=True)
    ]
    same = sum(a == e for a, e in pairs)
    summary = {
        "dialogues": len(dialogues),
        "turns": len(pairs),
        "probes": probes,
        "recall_api": api_hits / probes,
        "recall_engine": engine_hits / probes,
        "identical_replies": same / len(pairs),
        "api_seconds": api_s,
        "concurrency": args.concurrency,
    }
    print(
        f"{len(dialogues)} dialogues, {len(pairs)} turns, {probes} probes; "
        f"free-running recall through the API {api_hits / probes:.3f}, engine directly "
        f"{engine_hits / probes:.3f}; identical replies {same}/{len(pairs)}; "
        f"API pass {api_s:.1f} s at concurrency {args.concurrency}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
