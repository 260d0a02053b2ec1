"""Two ``rxt serve`` processes sharing one real ``redis-server``: alternate turns, one memory.

Both servers load the same saved model and store every conversation's STM versions in the
same Redis. A client sends turn 1 of a conversation to server A, turn 2 to server B, turn 3
to A, ... and each next turn leaves the moment the previous answer's final event arrives —
before the answering server has written the new memory. That is the race the *pending*
bindings (``service.py``) resolve: the other server must wait for the commit instead of
continuing from the stale memory, missing the state (and replaying or restarting the
conversation), or forking it.

On loopback a commit usually lands a few milliseconds after the final event, about when the
next request reaches the other server, so the race would be hit only now and then. The
servers therefore reach Redis through :class:`~redis_support.SlowWrites`, which holds every
version append back by ``COMMIT_DELAY_S``: every next turn then arrives while the previous
turn's state is still being written, and the tests check (from the proxy's log) that it did.

Skipped without ``redis-server`` (a failure under ``RXT_REQUIRE_REDIS=1``, as in CI).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from redis_support import SlowWrites, redis_binary, redis_server
from rxt import ReactiveTransformer
from rxt.engine import Engine, SamplingParams
from rxt.engine.state import stm_from_bytes, stm_to_bytes
from rxt.serve.auth import DEV_OWNER
from rxt.serve.store import StateStore, open_store
from rxt.serve.store import redis as store_redis
from serve_support import CONVERSATION_HEADER, MODEL_NAME, ServerProcess, save_small_model

MAX_TOKENS = 8
COMMIT_DELAY_S = 0.5  # how long each version append takes to reach Redis
TURNS = 4
COUNTERS = (
    "rxt_turns_total",
    "rxt_conversation_forks_total",
    "rxt_replayed_turns_total",
    "rxt_state_commit_failures_total",
)
QUERIES = [
    "Hello there, who are you?",
    "Tell me about the sea.",
    "And what about the mountains?",
    "Which one do you like more?",
    "Thanks, that is all.",
]


# ------------------------------------------------------------------------------------ fixtures
@dataclass
class Cluster:
    url: str  # the shared Redis (the servers reach it through ``proxy``)
    model_dir: Path
    servers: list[ServerProcess]
    logs: list[Path]
    proxy: SlowWrites

    def committed_at(self, cid: str, version: int) -> float:
        """When the append of ``cid``'s ``version`` was sent on to Redis (after its delay)."""
        conv_key = f":conv:{cid}".encode()
        for at, args in self.proxy.forwarded:  # sha, numkeys, 5 keys, expected version, ...
            if args[2].endswith(conv_key) and args[7] == str(version - 1).encode():
                return at
        raise AssertionError(f"no append of {cid} version {version} went through the proxy")

    def clients(self) -> list[openai.OpenAI]:
        # max_retries=0: the client would otherwise retry a 409/5xx and hide it.
        return [
            openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for s in self.servers
        ]

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_binary()  # skip (or fail under RXT_REQUIRE_REDIS=1) before the model is saved
    root = tmp_path_factory.mktemp("redis-serve")
    model_dir = save_small_model(root / "model")
    with (
        redis_server(root) as url,
        SlowWrites(url, [store_redis._APPEND], COMMIT_DELAY_S) as proxy,
    ):
        logs = [root / "server-a.log", root / "server-b.log"]
        # Both processes start (import torch, load the model) at once; then both must be up.
        servers = [ServerProcess(model_dir, proxy.url, log=log) for log in logs]
        try:
            with servers[0], servers[1]:
                cluster = Cluster(url, model_dir, servers, logs, proxy)
                warm_up(cluster)
                yield cluster
        finally:
            for server in servers:
                server.kill()  # a no-op once stopped; else one that failed to start


@pytest.fixture(scope="module")
def store(cluster: Cluster) -> Iterator[StateStore]:
    with open_store(cluster.url) as s:  # the servers' store, read from the test process
        yield s


@pytest.fixture(scope="module")
def engine(cluster: Cluster) -> Iterator[Engine]:
    """The reference: the same saved model, driven directly in this process."""
    model = ReactiveTransformer.from_pretrained(cluster.model_dir)
    with Engine(model) as e:
        yield e


# ------------------------------------------------------------------------------------ helpers
def metrics(server: ServerProcess) -> dict[str, float]:
    """Every sample of GET /metrics, labels folded into the name: ``name{k=v,...}``."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def wait_idle(cluster: Cluster, timeout: float = 30.0) -> None:
    """Until no server has a turn in flight: answers go out *before* their memory is stored,
    so the last turn's commit may still be running when the client has its reply."""
    deadline = time.monotonic() + timeout
    while True:
        if all(metrics(s)["rxt_active_conversations"] == 0 for s in cluster.servers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"servers still busy after {timeout} s\n{cluster.log_tail()}")
        time.sleep(0.02)


def warm_up(cluster: Cluster) -> None:
    """One unstored streamed response from each server. The first streamed response an
    ``openai`` client parses costs it most of a second (building the event models), which would
    otherwise delay the tests' first next turns past the previous commit."""
    for client in cluster.clients():
        with client.responses.create(
            model=MODEL_NAME, input="Hi", store=False, max_output_tokens=2, stream=True
        ) as stream:
            for _ in stream:
                pass


def initial_state(engine: Engine, seed: int) -> bytes:
    """Version 0 of a conversation, as the server builds it (``TurnService.load``): STM_0
    drawn from the conversation's stored ``stm_seed``."""
    stm = engine.model.initial_stm(1, generator=torch.Generator().manual_seed(seed))
    return stm_to_bytes(stm, fingerprint=engine.fingerprint, metadata={"turns": "0"})


def stored_stm(engine: Engine, state: bytes) -> torch.Tensor:
    shape = engine.model.config.stm_shape
    return stm_from_bytes(state, fingerprint=engine.fingerprint, shape=shape)[0]


@dataclass
class Dialogue:
    """One conversation as the client saw it."""

    api: str
    system: str | None = None
    replies: list[str] = field(default_factory=list)
    conversation_ids: list[str] = field(default_factory=list)  # per turn, from the header
    response_ids: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # time.time() each turn was sent
    created: str | None = None  # POST /v1/conversations id


def chat_turns(clients: list[openai.OpenAI], d: Dialogue) -> None:
    """Whole transcripts to /v1/chat/completions: the server finds the state by its hash."""
    messages: list[dict] = [{"role": "system", "content": d.system}] if d.system else []
    for k in range(TURNS):
        messages.append({"role": "user", "content": QUERIES[k]})
        d.sent_at.append(time.time())
        stream = clients[k % 2].chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
        )
        pieces, finish = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
                break  # the final event: send the next turn now, not after [DONE]
        d.conversation_ids.append(stream.response.headers[CONVERSATION_HEADER])
        stream.close()
        assert finish in ("length", "stop"), finish
        d.replies.append("".join(pieces))
        messages.append({"role": "assistant", "content": d.replies[-1]})


def responses_turns(clients: list[openai.OpenAI], d: Dialogue) -> None:
    """/v1/responses chained by previous_response_id, or appended to ``d.created``."""
    for k in range(TURNS):
        extra: dict = {}
        if d.created is not None:
            extra["conversation"] = d.created
        elif k == 0:
            extra["instructions"] = d.system
        else:
            extra["previous_response_id"] = d.response_ids[-1]
        d.sent_at.append(time.time())
        stream = clients[k % 2].responses.create(
            model=MODEL_NAME,
            input=QUERIES[k],
            temperature=0,
            max_output_tokens=MAX_TOKENS,
            stream=True,
            **extra,
        )
        deltas, final = [], None
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete", "error"):
                final = event
                break  # the final event: send the next turn now
        d.conversation_ids.append(stream.response.headers[CONVERSATION_HEADER])
        stream.close()
        assert final is not None and final.type != "error", final
        assert final.response.output_text == "".join(deltas)
        d.replies.append(final.response.output_text)
        d.response_ids.append(final.response.id)


def run_all(jobs: list[Callable[[], None]], timeout: float = 120.0) -> None:
    """Run the jobs in threads at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------ tests
def test_alternating_servers_continue_one_memory(
    cluster: Cluster, store: StateStore, engine: Engine
) -> None:
    """Six conversations at once (two per API: chat transcripts, previous_response_id, and a
    created conversation; one of each with a system prompt), every turn on the other server.

    Checked: no request fails (the clients never retry); no server forked or replayed
    anything; every turn of a conversation landed in the same conversation, whose stored
    version count equals its turn count and whose stored turns are the client's, in order.

    Equivalence, the crux: the STM a turn starts from is what decides its greedy answer, so
    each conversation is re-run as a reference and compared. Not through one server: a new
    conversation draws a random ``stm_seed`` for its STM_0, so a second run would start from
    another memory. Instead the engine is driven directly (this process, one conversation,
    no store, no race) from the server's own version 0 — STM_0 drawn from the ``stm_seed``
    in the conversation's metadata, then its system prompt, exactly as ``TurnService.load``
    builds it — asking the same queries. Every reply must match the alternating servers'
    reply, and every stored version must hold the reference memory after that turn (to
    float tolerance: batching with other conversations changes float rounding, not the
    greedy tokens). A server that read a stale or missing state would answer from another
    memory, or store one.
    """
    clients = cluster.clients()
    before = [metrics(s) for s in cluster.servers]
    dialogues = [
        Dialogue("chat"),
        Dialogue("chat", system="You are a terse sailor."),
        Dialogue("responses"),
        Dialogue("responses", system="Answer like a poet."),
    ]
    for system in (None, "Speak as a mountaineer."):
        items = [{"type": "message", "role": "system", "content": system}] if system else None
        created = clients[1].conversations.create(
            metadata={"test": "redis"}, **({"items": items} if items else {})
        )
        dialogues.append(Dialogue("conversation", system=system, created=created.id))

    def job(d: Dialogue) -> Callable[[], None]:
        return lambda: (chat_turns if d.api == "chat" else responses_turns)(clients, d)

    run_all([job(d) for d in dialogues])
    wait_idle(cluster)
    after = [metrics(s) for s in cluster.servers]
    log = cluster.log_tail()

    # -- the servers: every request answered 200, nothing forked, replayed or lost
    for b, a in zip(before, after, strict=True):
        requests = {k: a[k] - b.get(k, 0) for k in a if k.startswith("rxt_requests_total{")}
        assert all("status=200" in k for k, v in requests.items() if v), (requests, log)
        grown = {name: total(a, name) - total(b, name) for name in COUNTERS}
        assert grown == {
            "rxt_turns_total": len(dialogues) * TURNS / 2,  # each server half of the turns
            "rxt_conversation_forks_total": 0,
            "rxt_replayed_turns_total": 0,
            "rxt_state_commit_failures_total": 0,
        }, (grown, log)

    sampling = SamplingParams(temperature=0, max_new_tokens=MAX_TOKENS)
    lead: list[float] = []  # per next turn: how long before the previous commit it was sent
    for d in dialogues:
        # -- one conversation, all its turns stored in order
        assert len(set(d.conversation_ids)) == 1, (d.api, d.conversation_ids)
        cid = d.conversation_ids[0]
        if d.created is not None:
            assert cid == d.created
        info = store.get_conversation(DEV_OWNER, cid)
        assert info is not None and info.latest_version == TURNS, (d.api, info)
        assert info.metadata["forked_from"] is None
        assert (info.metadata["system"] or None) == d.system
        turns = store.turns(DEV_OWNER, cid)
        assert [(t["turn"], t["user"], t["assistant"]) for t in turns] == [
            (k + 1, QUERIES[k], d.replies[k]) for k in range(TURNS)
        ]
        assert not any(t.get("replayed") for t in turns)
        if d.response_ids:
            assert [t["response_id"] for t in turns] == d.response_ids

        # -- the reference: the same queries on the engine from the same version 0
        conv = engine.conversation(state=initial_state(engine, info.metadata["stm_seed"]))
        if d.system:
            conv.absorb_system(d.system)
        for k in range(TURNS):
            want = conv.ask(QUERIES[k], sampling)
            assert d.replies[k] == want.text, (d.api, k, d.replies, log)
            stored = store.get_version(DEV_OWNER, cid, k + 1)
            torch.testing.assert_close(
                stored_stm(engine, stored.state), conv.stm, atol=1e-5, rtol=0
            )
            if k + 1 < TURNS:
                lead.append(cluster.committed_at(cid, k + 1) - d.sent_at[k + 1])
    # The race was run: the next turns were on their way before the previous commit (nearly
    # all of them; a loaded machine may stall a client thread for longer than the delay).
    raced = sum(t > 0 for t in lead)
    print(f"{raced} of {len(lead)} next turns sent before the previous turn's commit")
    assert raced >= len(lead) * 2 // 3, sorted(lead)


def test_concurrent_turns_on_one_conversation_commit_or_fork(
    cluster: Cluster, store: StateStore, engine: Engine
) -> None:
    """Both servers answer a turn of one conversation at the same instant, round after round.

    Each pair either commits in order (the second server saw the first's pending turn and
    waited) or races, in which case exactly one wins the compare-and-set and the other is
    forked into a new conversation. Never is a turn lost or computed from a replaced memory:
    the conversation's versions plus one version per fork add up to every turn sent, the fork
    metric counts the forks, every response id still resolves to its own answer, and every
    stored version is what the engine answers from the version it says it continued."""
    clients = cluster.clients()
    rounds = 3
    forks_before = sum(total(metrics(s), "rxt_conversation_forks_total") for s in cluster.servers)
    cid = clients[0].conversations.create().id
    barrier = threading.Barrier(2, timeout=60)
    answers: dict[str, str] = {}  # response id -> text

    def worker(i: int) -> None:
        try:
            for r in range(rounds):
                barrier.wait()
                response = clients[i].responses.create(
                    model=MODEL_NAME,
                    input=f"Round {r}: {QUERIES[i]}",
                    conversation=cid,
                    temperature=0,
                    max_output_tokens=MAX_TOKENS,
                )
                answers[response.id] = response.output_text
        except BaseException:
            barrier.abort()  # do not leave the other worker waiting
            raise

    run_all([lambda: worker(0), lambda: worker(1)])
    wait_idle(cluster)
    log = cluster.log_tail()
    forks = sum(total(metrics(s), "rxt_conversation_forks_total") for s in cluster.servers)
    forks -= forks_before

    info = store.get_conversation(DEV_OWNER, cid)
    children = [
        c
        for c in store.list_conversations(DEV_OWNER, limit=100)
        if (c.metadata.get("forked_from") or {}).get("conversation_id") == cid
    ]
    assert len(children) == forks, (forks, children, log)
    assert info.latest_version + forks == 2 * rounds, (info.latest_version, forks, log)
    print(f"{forks:.0f} of {rounds} rounds raced and forked")

    # Every stored turn, with the state it continued: (turn, its state, the state before it).
    seed = info.metadata["stm_seed"]
    turns = store.turns(DEV_OWNER, cid)
    assert [t["turn"] for t in turns] == list(range(1, info.latest_version + 1))
    chain = []
    for k, turn in enumerate(turns, 1):
        prior = store.get_version(DEV_OWNER, cid, k - 1).state if k > 1 else None
        chain.append((turn, store.get_version(DEV_OWNER, cid, k).state, prior))
    for child in children:
        parent = child.metadata["forked_from"]["version"]
        assert parent < info.latest_version  # the version it lost to is there
        assert child.latest_version == 1 and child.metadata["stm_seed"] == seed
        (turn,) = store.turns(DEV_OWNER, child.conversation_id)
        assert turn["turn"] == parent + 1
        prior = store.get_version(DEV_OWNER, cid, parent).state if parent else None
        chain.append((turn, store.get_version(DEV_OWNER, child.conversation_id, 1).state, prior))

    assert sorted(t["response_id"] for t, _, _ in chain) == sorted(answers)
    sampling = SamplingParams(temperature=0, max_new_tokens=MAX_TOKENS)
    for turn, state, prior in chain:
        assert turn["assistant"] == answers[turn["response_id"]]
        conv = engine.conversation(state=prior or initial_state(engine, seed))
        assert conv.ask(turn["user"], sampling).text == turn["assistant"], (turn, log)
        torch.testing.assert_close(stored_stm(engine, state), conv.stm, atol=1e-5, rtol=0)
    for rid, text in answers.items():  # each id still names its own answer, on either server
        for client in clients:
            assert client.responses.retrieve(rid).output_text == text


def race_and_continue(clients: list[openai.OpenAI], cid: str) -> dict[int, object]:
    """Client i sends a turn of ``cid`` to server i, both at once; each continues its
    response on the other server the moment it arrives. The follow-up ids (or errors)."""
    barrier = threading.Barrier(2, timeout=60)
    follow_ups: dict[int, object] = {}

    def worker(i: int) -> None:
        barrier.wait()
        first = clients[i].responses.create(
            model=MODEL_NAME, input=QUERIES[i], conversation=cid, max_output_tokens=4
        )
        try:
            follow_ups[i] = (
                clients[1 - i]
                .responses.create(
                    model=MODEL_NAME,
                    input=QUERIES[2],
                    previous_response_id=first.id,
                    max_output_tokens=4,
                )
                .id
            )
        except openai.APIStatusError as exc:
            follow_ups[i] = exc

    run_all([lambda: worker(0), lambda: worker(1)])
    return follow_ups


def test_forked_response_continues_at_once_on_the_other_server(
    cluster: Cluster, store: StateStore
) -> None:
    """A turn that lost the race (and is being forked) is continued, by previous_response_id,
    on the other server the moment its answer arrives: its id must resolve to the fork, as it
    does a moment later, not be reported missing."""
    clients = cluster.clients()
    for _ in range(3):  # until a round races (almost always the first)
        cid = clients[0].conversations.create().id
        follow_ups = race_and_continue(clients, cid)
        wait_idle(cluster)
        if any(
            (c.metadata.get("forked_from") or {}).get("conversation_id") == cid
            for c in store.list_conversations(DEV_OWNER, limit=100)
        ):
            break
    else:
        pytest.skip("no round raced: both turns committed in order")
    assert all(isinstance(v, str) for v in follow_ups.values()), follow_ups
