"""The event-driven engine (rxt.engine): behaviour, and equivalence with the reference loops.

The backbone is equivalence: whatever the engine does concurrently — packing conversations into
one decoding batch, rows joining and leaving at different steps, memory updates on their own
thread, several client threads — every turn must produce exactly the tokens and the memory that
the plain synchronous reference gives (``greedy_answer`` and ``model.update_memory`` by hand),
or that the same conversation gives when it runs alone.

Every blocking call has a timeout, and a watchdog aborts the run if one still hangs, so an engine
bug fails CI instead of stalling it.
"""

from __future__ import annotations

import faulthandler
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data.synthetic import synthetic_corpus
from rxt.engine import (
    Conversation,
    Engine,
    EngineError,
    EngineStats,
    SamplingParams,
    StateError,
    TurnResult,
    TurnStream,
    UpdateEvent,
)
from rxt.engine import rows as rows_module
from rxt.engine.greedy import greedy_answer
from rxt.engine.rows import RowPool
from rxt.engine.state import stm_to_bytes
from rxt.tokenizer import RxTTokenizer

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

TIMEOUT = 10.0  # seconds, for every blocking call
WATCHDOG = 60.0  # a test that runs longer than this is hung: dump stacks and abort

Query = str | Sequence[int]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    # `TurnStream` iteration/`result()`, `Conversation.stm`/`fork`/`reset` and `Engine.close`
    # take no timeout; if an engine bug makes one hang, fail loudly instead of stalling CI.
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class _NanEmptyTorch:
    """``torch`` as seen by rows.py, except that float ``torch.empty`` tensors are NaN-filled."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(scope="module")
def tok() -> RxTTokenizer:
    return RxTTokenizer.train(synthetic_corpus(2000), vocab_size=1024)


def _build(config: RxTConfig, tok: RxTTokenizer, seed: int = 0) -> ReactiveTransformer:
    torch.manual_seed(seed)
    model = ReactiveTransformer(config).eval()
    model.tokenizer = tok
    return model


def _with_eos_bias(model: ReactiveTransformer, alpha: float) -> ReactiveTransformer:
    """Point the LM head's EOS row along the decoder's typical output direction, so that random
    weights end answers at EOS now and then (at varied lengths) instead of never."""
    tok = model.tokenizer
    assert tok is not None
    with torch.no_grad():
        stm = model.initial_stm(1, generator=torch.Generator().manual_seed(0))
        ids = torch.tensor([tok.encode_query("What colour is the car? It is red.")])
        direction = model.decoder_forward(ids, stm).hidden_states[0].mean(0)
        model.lm_head.weight[tok.eos_id] = alpha * direction / direction.norm()
    return model


@pytest.fixture(scope="module")
def model(tok: RxTTokenizer) -> ReactiveTransformer:
    """The ``tiny`` preset (dense GQA decoder, max_seq_len 128), seeded."""
    return _build(RxTConfig.preset("tiny"), tok)


@pytest.fixture(scope="module")
def eos_model(tok: RxTTokenizer) -> ReactiveTransformer:
    """``tiny`` whose answers sometimes end at EOS (sampled turns mostly, greedy rarely)."""
    return _with_eos_bias(_build(RxTConfig.preset("tiny"), tok), alpha=1.2)


@pytest.fixture
def moe_model(moe_sqa_config: RxTConfig, tok: RxTTokenizer) -> ReactiveTransformer:
    """conftest's MoE + SQA model (interlayer memory, max_seq_len 64) with EOS bias.

    Its vocabulary is raised from 256 to 1024: a byte-level BPE tokenizer cannot have fewer
    than 8 + 256 tokens, and ``Engine`` refuses a tokenizer larger than the model's vocab."""
    return _with_eos_bias(_build(moe_sqa_config.replace(vocab_size=1024), tok), alpha=1.0)


@pytest.fixture
def any_model(request: pytest.FixtureRequest) -> ReactiveTransformer:
    return request.getfixturevalue(request.param)


MODELS = pytest.mark.parametrize("any_model", ["model", "eos_model", "moe_model"], indirect=True)


# --------------------------------------------------------------------------- references
def prompt_of(tok: RxTTokenizer, query: Query) -> list[int]:
    """The formatted prompt the engine decodes for ``query`` (text or query ids)."""
    if isinstance(query, str):
        return tok.encode_query(query)
    return [tok.bos_id, tok.query_id, *query, tok.answer_id]


def reference_answer(
    model: ReactiveTransformer, query: Query, stm: torch.Tensor, max_new_tokens: int
) -> list[int]:
    """Greedy answer by the reference loop that recomputes the whole turn at every step."""
    tok = model.tokenizer
    assert tok is not None
    prompt = torch.tensor([prompt_of(tok, query)])
    return greedy_answer(
        model, prompt, stm, max_new_tokens=max_new_tokens, eos_id=tok.eos_id, use_cache=False
    )


def interaction(model: ReactiveTransformer, query: Query, answer: Sequence[int]) -> list[int]:
    """concat(X_t, Y_t) as the encoder sees it: EOS appended unless the answer ended with it
    (or the turn already fills max_seq_len)."""
    tok = model.tokenizer
    assert tok is not None
    ids = [*prompt_of(tok, query), *answer]
    if ids[-1] != tok.eos_id and len(ids) < model.config.max_seq_len:
        ids.append(tok.eos_id)
    return ids


def replay(
    model: ReactiveTransformer, stm: torch.Tensor, turns: Sequence[tuple[Query, Sequence[int]]]
) -> torch.Tensor:
    """STM after applying ``model.update_memory`` by hand to each (query, answer) in turn."""
    with torch.no_grad():
        for query, answer in turns:
            stm = model.update_memory(stm, torch.tensor([interaction(model, query, answer)]))
    return stm


def committed(conv: Conversation) -> torch.Tensor:
    conv.wait(timeout=TIMEOUT)
    return conv.stm


def finish(stream: TurnStream) -> TurnResult:
    """The turn's result once its memory update has committed (never blocks without bound)."""
    stream.wait_update(timeout=TIMEOUT)
    return stream.result()


def assert_stm_equal(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


class Recorder:
    """An ``on_update`` listener that keeps every event and lets tests wait for one."""

    def __init__(self) -> None:
        self.events: list[UpdateEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: UpdateEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, kind: str, turn: int) -> UpdateEvent:
        def find() -> UpdateEvent | None:
            return next((e for e in self.events if (e.kind, e.turn) == (kind, turn)), None)

        with self._cond:
            assert self._cond.wait_for(lambda: find() is not None, TIMEOUT), (kind, turn)
            event = find()
        assert event is not None
        return event

    def kinds(self) -> list[tuple[str, int]]:
        with self._cond:
            return [(e.kind, e.turn) for e in self.events]


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every decode step take >= 5 ms, so a long answer cannot finish before the test
    acts on it (cancel, queue behind it) however the threads are scheduled."""
    step = RowPool.step

    def slow(self: RowPool, generators: Any) -> list[int]:
        time.sleep(0.005)
        return step(self, generators)

    monkeypatch.setattr(RowPool, "step", slow)


# --------------------------------------------------------------------------- 1. greedy == reference
@MODELS
def test_engine_greedy_equals_reference_loop(any_model: ReactiveTransformer) -> None:
    model = any_model
    budget = 40 if model.config.max_seq_len > 64 else 24
    queries: list[Query] = [
        "Hello there",
        "What colour is the car? It is red.",
        "Tell me about the house, please. Where does Anna live?",
        [300, 17, 42, 99],
        "x",
    ]
    with Engine(model) as engine:
        for i, query in enumerate(queries):
            conv = engine.conversation(seed=i)
            stm = committed(conv)
            result = finish(conv.send(query, max_new_tokens=budget))
            assert result.token_ids == reference_answer(model, query, stm, budget), query
        # Several turns on one conversation: each from the memory the previous one committed.
        conv = engine.conversation(seed=11)
        for query in queries[:3]:
            stm = committed(conv)
            result = finish(conv.send(query, max_new_tokens=budget))
            assert result.token_ids == reference_answer(model, query, stm, budget), query


# --------------------------------------------------------------------------- 2. memory == replay
@MODELS
def test_stored_memory_equals_replayed_updates(any_model: ReactiveTransformer) -> None:
    model = any_model
    turns: list[tuple[Query, dict[str, Any]]] = [
        ("My name is Anna and I live in Paris.", {"max_new_tokens": 12}),
        ("What colour is the bike?", {"max_new_tokens": 20, "temperature": 0.9, "top_k": 50}),
        ([40, 41, 42], {"max_new_tokens": 8, "stop_at_eos": False}),
        ("Where does Anna live?", {"max_new_tokens": 16, "temperature": 0.7, "seed": 5}),
        ("Tell me about the car, please.", {"max_new_tokens": 10, "repetition_penalty": 1.3}),
    ]
    with Engine(model) as engine:
        conv = engine.conversation(seed=3)
        stm0 = committed(conv)
        done: list[tuple[Query, list[int]]] = []
        for query, params in turns:
            result = finish(conv.send(query, **params))
            done.append((query, result.token_ids))
            assert_stm_equal(committed(conv), replay(model, stm0, done))
        assert conv.turns == len(turns)
        assert not torch.equal(committed(conv), stm0)


def test_turn_filling_max_seq_len_is_stored_without_eos(moe_model: ReactiveTransformer) -> None:
    # prompt + answer == max_seq_len: the engine cannot append EOS to the interaction, and the
    # last answer token is produced with no position left after it.
    model = moe_model
    query = [50, 51, 52, 53, 54]
    budget = model.config.max_seq_len - len(prompt_of(model.tokenizer, query))
    with Engine(model) as engine:
        conv = engine.conversation(seed=1)
        stm0 = committed(conv)
        result = finish(conv.send(query, max_new_tokens=budget, stop_at_eos=False))
        assert result.finish_reason == "length" and len(result.token_ids) == budget
        assert len(interaction(model, query, result.token_ids)) == model.config.max_seq_len
        assert_stm_equal(committed(conv), replay(model, stm0, [(query, result.token_ids)]))


# --------------------------------------------------------------------------- 3. batched == alone
# Per conversation: its seed and, per turn, (query, sampling overrides). Queries differ in length,
# max_new_tokens differs so rows leave at different steps, and sampled rows draw from the
# conversation's generator or from a per-turn seed.
SPECS: list[tuple[int, list[tuple[Query, dict[str, Any]]]]] = [
    (
        0,
        [
            ("Hello", {"max_new_tokens": 5}),
            ("What colour is the car? It is red.", {"max_new_tokens": 20}),
            ("Where?", {"max_new_tokens": 3}),
        ],
    ),
    (
        1,
        [
            ("My name is Tom and I live in Rome.", {"max_new_tokens": 30, "temperature": 0.9}),
            ("Hi", {"max_new_tokens": 7, "temperature": 0.9, "top_k": 50}),
            ("Tell me about the house, please.", {"max_new_tokens": 25, "temperature": 0.9}),
        ],
    ),
    (
        2,
        [
            ([300, 301, 302], {"max_new_tokens": 12, "temperature": 0.9, "top_k": 50, "seed": 7}),
            ("Where does Eve live?", {"max_new_tokens": 30, "seed": 8, "temperature": 1.0}),
            ([9, 10], {"max_new_tokens": 1}),
        ],
    ),
    (
        3,
        [
            ("The bike is blue.", {"max_new_tokens": 18, "stop_at_eos": False}),
            ("What colour is the bike?", {"max_new_tokens": 30, "temperature": 0.9}),
            ("And the car?", {"max_new_tokens": 9, "top_p": 0.9, "temperature": 0.8}),
        ],
    ),
    (
        4,
        [
            ("Why", {"max_new_tokens": 26, "temperature": 0.9, "top_k": 50}),
            ("Tell me about the car, please.", {"max_new_tokens": 4}),
            ("Ok", {"max_new_tokens": 30, "temperature": 1.0, "repetition_penalty": 1.2}),
        ],
    ),
    (
        5,
        [
            ("Where does Bob live? In Oslo.", {"max_new_tokens": 9, "temperature": 0.9}),
            ("Good", {"max_new_tokens": 30, "stop_at_eos": False, "temperature": 0.9}),
            ("What colour is the house?", {"max_new_tokens": 15, "min_new_tokens": 3}),
        ],
    ),
]
BATCH_MODELS = pytest.mark.parametrize("any_model", ["eos_model", "moe_model"], indirect=True)


def _turn(i: int, t: int) -> tuple[Query, dict[str, Any]]:
    return SPECS[i][1][t]


def run_alone(convs: Sequence[Conversation]) -> list[list[TurnResult]]:
    """Each conversation's turns with nothing else in the engine."""
    out = []
    for conv, (_, turns) in zip(convs, SPECS, strict=True):
        out.append([finish(conv.send(query, **params)) for query, params in turns])
    return out


def assert_same_turns(got: list[list[TurnResult]], want: list[list[TurnResult]]) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        for t, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x.token_ids == y.token_ids, f"conversation {i}, turn {t + 1}"
            assert x.finish_reason == y.finish_reason, f"conversation {i}, turn {t + 1}"


@BATCH_MODELS
def test_batched_turns_equal_each_conversation_alone(any_model: ReactiveTransformer) -> None:
    with Engine(any_model) as engine:
        convs = [engine.conversation(seed=seed) for seed, _ in SPECS]
        alone = [c.fork() for c in convs]  # same STM_0 and sampling-generator state
        batched: list[list[TurnResult]] = [[] for _ in convs]
        for t in range(3):
            streams = []
            for i, conv in enumerate(convs):
                query, params = _turn(i, t)
                streams.append(conv.send(query, **params))
            for i, stream in enumerate(streams):
                batched[i].append(finish(stream))
        want = run_alone(alone)
        assert_same_turns(batched, want)
        for a, b in zip(convs, alone, strict=True):
            assert_stm_equal(committed(a), committed(b))
    reasons = {r.finish_reason for turns in batched for r in turns}
    assert reasons == {"eos", "length"}  # rows left the batch both ways


@BATCH_MODELS
def test_turns_joining_mid_answer_equal_each_conversation_alone(
    any_model: ReactiveTransformer,
) -> None:
    with Engine(any_model) as engine:
        convs = [engine.conversation(seed=seed) for seed, _ in SPECS]
        alone = [c.fork() for c in convs]
        got: list[list[TurnResult]] = [[] for _ in convs]
        for t in range(3):
            # Half the conversations start; a few tokens in, the other half join the batch.
            first = {i: convs[i].send(_turn(i, t)[0], **_turn(i, t)[1]) for i in (0, 2, 4)}
            pieces = {i: iter(s) for i, s in first.items()}
            for it in pieces.values():
                next(it)  # every turn yields at least one token
            second = {i: convs[i].send(_turn(i, t)[0], **_turn(i, t)[1]) for i in (1, 3, 5)}
            for i, stream in sorted({**first, **second}.items()):
                got[i].append(finish(stream))
        assert_same_turns(got, run_alone(alone))
        for a, b in zip(convs, alone, strict=True):
            assert_stm_equal(committed(a), committed(b))


def test_ragged_batch_never_reads_unwritten_cache(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.empty hands back whatever memory the allocator had, which on a real run sometimes
    # holds NaN/inf: make every float torch.empty in rows.py NaN so the outcome is not luck.
    monkeypatch.setattr(rows_module, "torch", _NanEmptyTorch())
    long_query, short_query = "What colour is the car? It is red. Where does Anna live?", "Hi"
    with Engine(model) as engine:
        long_conv, short_conv = engine.conversation(seed=1), engine.conversation(seed=2)
        stm_long, stm_short = committed(long_conv), committed(short_conv)
        # The long turn first: however far it got alone, the rows never have equal lengths.
        long_stream = long_conv.send(long_query, max_new_tokens=20)
        short_stream = short_conv.send(short_query, max_new_tokens=20)
        r_long, r_short = finish(long_stream), finish(short_stream)
    assert r_long.token_ids == reference_answer(model, long_query, stm_long, 20)
    assert r_short.token_ids == reference_answer(model, short_query, stm_short, 20)


# --------------------------------------------------------------------------- 4. async update
def test_stream_ends_before_its_memory_update_starts(model: ReactiveTransformer) -> None:
    recorder = Recorder()
    read_all = threading.Event()
    held: list[bool] = []

    def hold_update(event: UpdateEvent) -> None:
        recorder(event)
        if event.kind == "started":  # keep the update from running until the reader is done
            held.append(read_all.wait(TIMEOUT))

    with Engine(model) as engine:
        conv = engine.conversation(seed=1, on_update=hold_update)
        stream = conv.send("Hello there", max_new_tokens=15, stop_at_eos=False)
        pieces = list(stream)  # completes although the update is stuck at its start
        received_at = time.perf_counter()
        read_all.set()
        finished = recorder.wait_for("finished", 1)
        result = finish(stream)
    assert held == [True]
    started = recorder.wait_for("started", 1)
    assert recorder.kinds() == [("started", 1), ("finished", 1)]
    assert {e.conversation_id for e in recorder.events} == {conv.id}
    assert len([p for p in pieces if p.token_id is not None]) == 15
    # The update finished only after the reader had the whole answer ...
    assert finished.time >= received_at
    assert finished.timing is not None and finished.timing.finished_at == finished.time
    assert finished.timing.queued_at <= started.time <= finished.timing.started_at
    # ... and it was queued only after the last token had been produced (engine-side instant:
    # TurnResult times are relative to `send`, so the absolute one comes from the request).
    last_token_at = stream._request.last_token_at
    assert last_token_at == pytest.approx(stream._request.submitted_at + result.reply_s)
    assert last_token_at <= finished.timing.queued_at <= started.time


def test_unread_and_dropped_streams_still_update_memory(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        for read in (0, 2):
            recorder = Recorder()
            conv = engine.conversation(seed=4, on_update=recorder)
            stm0 = committed(conv)
            query = "Tell me about the bike, please."
            stream = conv.send(query, max_new_tokens=30, stop_at_eos=False)
            it = iter(stream)
            for _ in range(read):
                next(it)
            del it, stream  # never read to the end; nobody holds the stream
            recorder.wait_for("finished", 1)
            assert recorder.kinds() == [("started", 1), ("finished", 1)]
            answer = reference_answer(model, query, stm0, 30)
            assert len(answer) == 30
            assert_stm_equal(committed(conv), replay(model, stm0, [(query, answer)]))
            assert conv.turns == 1


def test_next_send_waits_for_pending_update_and_reads_new_memory(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = model.update_memory

    def slow_update(*args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(0.3)
        return update(*args, **kwargs)

    monkeypatch.setattr(model, "update_memory", slow_update)
    with Engine(model) as engine:
        recorder = Recorder()
        conv = engine.conversation(seed=2, on_update=recorder)
        stm0 = committed(conv)
        first = conv.send("My name is Tom.", max_new_tokens=10)
        r1 = first.result()  # the answer only: its update is still running
        assert conv.updating
        second = conv.send("What is my name?", max_new_tokens=10)
        r2 = finish(second)
        stm1 = replay(model, stm0, [("My name is Tom.", r1.token_ids)])
        assert r2.token_ids == reference_answer(model, "What is my name?", stm1, 10)
        assert r2.waited_s >= 0.1  # most of the 0.3 s update was still to run at `send`
        assert r2.ttft_s >= r2.waited_s
        assert r1.waited_s == 0
        # The second turn was admitted after the first update finished, never before.
        assert recorder.kinds() == [
            ("started", 1),
            ("finished", 1),
            ("started", 2),
            ("finished", 2),
        ]


def test_two_sends_without_reading_are_serialised(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=8)
        stm0 = committed(conv)
        q1, q2 = "Where does Eve live? In Oslo.", "Where does Eve live?"
        s1 = conv.send(q1, max_new_tokens=20)
        s2 = conv.send(q2, max_new_tokens=20)
        stm = conv.stm  # waits for both turns, read or not (the watchdog bounds it)
        assert not conv.updating and conv.turns == 2
        r2, r1 = finish(s2), finish(s1)
        assert (r1.turn, r2.turn) == (1, 2)
        assert r1.token_ids == reference_answer(model, q1, stm0, 20)
        stm1 = replay(model, stm0, [(q1, r1.token_ids)])
        assert r2.token_ids == reference_answer(model, q2, stm1, 20)
        assert_stm_equal(stm, replay(model, stm1, [(q2, r2.token_ids)]))
        # Turn 2 was sent while turn 1 was still being answered: it waited for that update.
        assert 0 < r2.waited_s <= r2.ttft_s


def test_close_finishes_queued_turns_and_updates(model: ReactiveTransformer) -> None:
    engine = Engine(model)
    conv = engine.conversation(seed=6)
    stm0 = committed(conv)
    streams = [conv.send(q, max_new_tokens=8) for q in ("One", "Two")]
    engine.close()
    results = [finish(s) for s in streams]
    assert [r.finish_reason for r in results] == ["length", "length"]
    turns = [("One", results[0].token_ids), ("Two", results[1].token_ids)]
    assert_stm_equal(committed(conv), replay(model, stm0, turns))


# --------------------------------------------------------------------------- 5. cancel
@pytest.mark.usefixtures("slow_steps")
def test_cancel_stops_generation_and_updates_with_partial_answer(
    model: ReactiveTransformer,
) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=9)
        stm0 = committed(conv)
        query = "Tell me about the car, please."
        limit = model.config.max_seq_len - len(prompt_of(model.tokenizer, query))
        stream = conv.send(query, max_new_tokens=limit, stop_at_eos=False)
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.cancel()
        result = finish(stream)
        assert result.finish_reason == "cancelled"
        assert 3 <= len(result.token_ids) < limit
        n = len(result.token_ids)
        assert result.token_ids == reference_answer(model, query, stm0, n)
        assert_stm_equal(committed(conv), replay(model, stm0, [(query, result.token_ids)]))
        assert conv.turns == 1


@pytest.mark.usefixtures("slow_steps")
def test_cancel_queued_turn_yields_nothing_and_no_update(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        recorder = Recorder()
        conv = engine.conversation(seed=10, on_update=recorder)
        stm0 = committed(conv)
        first = conv.send("Hello", max_new_tokens=60, stop_at_eos=False)
        queued = conv.send("Anyone?", max_new_tokens=10)
        queued.cancel()
        cancelled = queued.result()
        assert cancelled.finish_reason == "cancelled"
        assert cancelled.token_ids == [] and cancelled.text == ""
        r1 = finish(first)
        assert r1.finish_reason == "length" and len(r1.token_ids) == 60
        conv.wait(timeout=TIMEOUT)
        assert recorder.kinds() == [("started", 1), ("finished", 1)]
        assert_stm_equal(committed(conv), replay(model, stm0, [("Hello", r1.token_ids)]))
        assert conv.turns == 1


@pytest.mark.usefixtures("slow_steps")
def test_turn_after_a_cancelled_queued_turn_reads_the_committed_memory(
    model: ReactiveTransformer,
) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=10)
        stm0 = committed(conv)
        first = conv.send("Hello", max_new_tokens=60, stop_at_eos=False)
        conv.send("Anyone?", max_new_tokens=10).cancel()
        third = conv.send("Still there?", max_new_tokens=10)
        r1, r3 = finish(first), finish(third)
        stm1 = replay(model, stm0, [("Hello", r1.token_ids)])
        assert r3.token_ids == reference_answer(model, "Still there?", stm1, 10)
        assert_stm_equal(committed(conv), replay(model, stm1, [("Still there?", r3.token_ids)]))


# --------------------------------------------------------------------------- 6. STM operations
def test_fork_is_independent_and_continues_identically(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=12)
        finish(conv.send("My name is Anna.", max_new_tokens=6, temperature=0.9))
        before = committed(conv).clone()
        fork = conv.fork()
        assert fork.turns == conv.turns == 1 and fork.id != conv.id
        assert torch.equal(committed(fork), before)
        # A turn on the fork leaves the original untouched ...
        r_fork = finish(fork.send("Where do I live?", max_new_tokens=12, temperature=0.9))
        assert torch.equal(committed(conv), before)
        assert not torch.equal(committed(fork), before)
        assert fork.turns == 2 and conv.turns == 1
        # ... and the same turn on the original (same memory, same sampling-generator state)
        # gives the same answer and memory.
        r_conv = finish(conv.send("Where do I live?", max_new_tokens=12, temperature=0.9))
        assert r_conv.token_ids == r_fork.token_ids
        assert torch.equal(committed(conv), committed(fork))


def test_reset_returns_to_initial_memory(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=13)
        stm0 = committed(conv).clone()
        for q in ("One", "Two"):
            finish(conv.send(q, max_new_tokens=5))
        assert not torch.equal(committed(conv), stm0)
        conv.reset()
        assert torch.equal(committed(conv), stm0)
        assert torch.equal(committed(conv), committed(engine.conversation(seed=13)))
        assert conv.turns == 0
        # With a system prompt, reset re-encodes it as turn 0.
        text = "You are a helpful assistant."
        sys_conv = engine.conversation(system_prompt=text, seed=13)
        with_prompt = committed(sys_conv).clone()
        finish(sys_conv.send("Hi", max_new_tokens=5))
        sys_conv.reset()
        assert_stm_equal(committed(sys_conv), with_prompt, atol=0)


def test_export_import_round_trip_continues_identically(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=14)
        for q in ("My name is Bob.", "I live in Oslo."):
            finish(conv.send(q, max_new_tokens=8))
        blob = conv.export_state()
        assert isinstance(blob, bytes)
        restored = engine.conversation(state=blob)
        loaded = engine.conversation(seed=99)
        loaded.load_state(blob)
        for other in (restored, loaded):
            assert torch.equal(committed(other), committed(conv))
            assert other.turns == 2
        with Engine(model) as elsewhere:  # another engine serving the same weights
            moved = elsewhere.conversation(state=blob)
            assert torch.equal(committed(moved), committed(conv))
            r_moved = finish(moved.send("Where do I live?", max_new_tokens=10))
            stm_moved = committed(moved)
        results = [finish(c.send("Where do I live?", max_new_tokens=10)) for c in (conv, restored)]
        results.append(finish(loaded.send("Where do I live?", max_new_tokens=10)))
        for r in results:
            assert r.token_ids == r_moved.token_ids
            assert r.turn == 3
        for c in (conv, restored, loaded):
            assert torch.equal(committed(c), stm_moved)


def test_state_of_another_model_is_refused(model: ReactiveTransformer, tok: RxTTokenizer) -> None:
    other = _build(RxTConfig.preset("tiny"), tok, seed=1)  # same shapes, different weights
    with Engine(other) as foreign:
        conv = foreign.conversation(seed=1)
        finish(conv.send("Hello", max_new_tokens=4))
        blob = conv.export_state()
    with Engine(model) as engine:
        with pytest.raises(StateError, match="another model"):
            engine.conversation(state=blob)
        mine = engine.conversation(seed=1)
        before = committed(mine).clone()
        with pytest.raises(StateError, match="another model"):
            mine.load_state(blob)
        assert torch.equal(committed(mine), before)
        finish(mine.send("Still fine?", max_new_tokens=4))  # and it keeps working


def test_conversation_from_a_tensor_equals_one_from_its_bytes(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        source = engine.conversation(seed=16)
        finish(source.send("My name is Ada.", max_new_tokens=6))
        stm = committed(source).clone()
        blob = stm_to_bytes(stm, fingerprint=engine.fingerprint)
        from_bytes = engine.conversation(state=blob, seed=3)
        from_tensor = engine.conversation(stm=stm, seed=3)
        unbatched = engine.conversation(stm=stm[0], seed=3)
        for conv in (from_tensor, unbatched):
            assert torch.equal(committed(conv), committed(from_bytes))
            assert conv.turns == from_bytes.turns == 0
        stm.zero_()  # the conversation holds a copy: the caller's tensor is the caller's
        results = [
            finish(c.send("What is my name?", max_new_tokens=8))
            for c in (from_bytes, from_tensor, unbatched)
        ]
        assert results[0].token_ids == results[1].token_ids == results[2].token_ids
        assert torch.equal(committed(from_tensor), committed(from_bytes))
        assert torch.equal(committed(unbatched), committed(from_bytes))
        # A system prompt given with a memory is recorded, not encoded again (as with state=).
        prompted = engine.conversation(system_prompt="Be brief.", stm=committed(source))
        assert torch.equal(committed(prompted), committed(source)) and prompted.turns == 0


def test_conversation_stm_argument_is_validated(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        stm = committed(engine.conversation(seed=17))
        blob = engine.conversation(seed=17).export_state()
        with pytest.raises(ValueError, match=r"state= .* or stm= .*, not both"):
            engine.conversation(state=blob, stm=stm)
        with pytest.raises(StateError, match=r"stm shape mismatch: .*got \(1, 2, 16, 64\)"):
            engine.conversation(stm=stm[:, :, :16])
        broken = stm.clone()
        broken[0, 0, 0, 0] = float("nan")
        with pytest.raises(StateError, match="stm holds non-finite values"):
            engine.conversation(stm=broken)
        with pytest.raises(TypeError, match="stm must be a tensor, got bytes"):
            engine.conversation(stm=blob)
        # Lower precision is cast to the model's, as a loaded state is.
        half = engine.conversation(stm=stm.to(torch.bfloat16))
        assert committed(half).dtype == model.dtype
        assert torch.equal(committed(half), stm.to(torch.bfloat16).to(model.dtype))


def test_verify_checksum_false_skips_only_the_blob_checksum(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=18)
        finish(conv.send("Hello", max_new_tokens=4))
        blob = conv.export_state()
        tampered = bytearray(blob)
        tampered[-5] ^= 0x01  # one tensor byte
        with pytest.raises(StateError, match="checksum mismatch"):
            engine.conversation(state=bytes(tampered))  # the default checks, as before
        with pytest.raises(StateError, match="checksum mismatch"):
            engine.conversation().load_state(bytes(tampered))
        trusted = engine.conversation(state=blob, verify_checksum=False)
        assert torch.equal(committed(trusted), committed(conv)) and trusted.turns == 1
        with pytest.raises(StateError, match="another model"):  # other checks still run
            engine.conversation(
                state=blob.replace(engine.fingerprint.encode(), b"0" * 64), verify_checksum=False
            )


def test_system_prompt_is_encoded_as_turn_zero(model: ReactiveTransformer) -> None:
    text = "You are a concise assistant. Answer in one sentence."
    tok = model.tokenizer
    with Engine(model) as engine:
        recorder = Recorder()
        conv = engine.conversation(system_prompt=text, seed=15, on_update=recorder)
        stm = committed(conv)
        stm0 = committed(engine.conversation(seed=15))
        with torch.no_grad():
            want = model.update_memory(stm0, torch.tensor([tok.encode_system(text)]))
        assert_stm_equal(stm, want)
        assert recorder.kinds() == [("started", 0), ("finished", 0)]
        assert conv.turns == 0
        result = finish(conv.send("Hello", max_new_tokens=12))
        assert result.turn == 1
        assert result.token_ids == reference_answer(model, "Hello", stm, 12)


def test_absorb_replays_a_turn_into_memory_without_decoding(model: ReactiveTransformer) -> None:
    """A transcript's earlier turn written with ``absorb`` is the update of its interaction,
    counted as a turn; the next turn then reads that memory."""
    tok = model.tokenizer
    query, answer = "My cat is called Felix.", "Nice name!"
    with Engine(model) as engine:
        recorder = Recorder()
        conv = engine.conversation(seed=21, on_update=recorder)
        stm0 = committed(conv)
        conv.absorb(query, answer)
        stm1 = committed(conv)
        with torch.no_grad():
            ids = torch.tensor([tok.encode_interaction(query, answer).input_ids])
            want = model.update_memory(stm0, ids)
        assert_stm_equal(stm1, want)
        assert conv.turns == 1 and recorder.kinds() == [("started", 1), ("finished", 1)]
        result = finish(conv.send("What is my cat called?", max_new_tokens=8))
        assert result.turn == 2
        assert result.token_ids == reference_answer(model, "What is my cat called?", stm1, 8)
        system = engine.conversation(seed=21)
        system.absorb_system("Be brief.")
        assert_stm_equal(
            committed(system), committed(engine.conversation(system_prompt="Be brief.", seed=21))
        )
        with pytest.raises(ValueError, match="max_length"):
            conv.absorb("x " * 200, "y")
        assert conv.turns == 2  # the refused turn changed nothing


def test_poll_and_on_event_consume_a_turn_without_blocking(model: ReactiveTransformer) -> None:
    """What the server's event loop uses: ``on_event`` wakes it for tokens, the end and the
    memory update; ``poll`` never blocks and yields the same pieces as iteration."""
    wakes = threading.Semaphore(0)
    with Engine(model) as engine:
        conv = engine.conversation(seed=22)
        stream = conv.send("What colour is the car?", max_new_tokens=10, stop_at_eos=False)
        stream.on_event(wakes.release)
        pieces: list = []
        done = False
        while not done:
            assert wakes.acquire(timeout=30)
            got, done = stream.poll()
            pieces += got
        assert stream.finished and stream.poll() == ([], True)
        while not stream.update_finished:
            assert wakes.acquire(timeout=30)
        result = stream.result()
        assert stream.wait_update(0) is not None and stream.turn == result.turn == 1
    ids = [p.token_id for p in pieces if p.token_id is not None]
    assert ids == result.token_ids
    assert "".join(p.text for p in pieces) == result.text


# --------------------------------------------------------------------------- 7. streaming
def test_streamed_pieces_match_result(model: ReactiveTransformer) -> None:
    tok = model.tokenizer
    with Engine(model) as engine:
        conv = engine.conversation(seed=16)
        query = "What colour is the bike?"
        stream = conv.send(query, max_new_tokens=20, stop_at_eos=False)
        pieces = list(stream)
        result = finish(stream)
    ids = [p.token_id for p in pieces if p.token_id is not None]
    assert ids == result.token_ids and len(ids) == 20
    assert "".join(p.text for p in pieces) == tok.decode(ids) == result.text == stream.text
    assert result.query == query
    assert result.prompt_tokens == stream.prompt_tokens == len(tok.encode_query(query))
    assert result.finish_reason == "length"
    assert result.turn == 1
    assert 0 <= result.waited_s <= result.ttft_s <= result.reply_s


def test_streamed_text_equals_decoded_answer_for_random_bytes(model: ReactiveTransformer) -> None:
    # Hot sampling from random weights emits stray byte tokens (incomplete UTF-8): the pieces
    # may hold text back, but together they must still be exactly the decoded answer.
    tok = model.tokenizer
    with Engine(model) as engine:
        streams = [
            engine.conversation(seed=s).send("Hi", max_new_tokens=40, temperature=3.0, seed=s)
            for s in range(8)
        ]
        for stream in streams:
            pieces = list(stream)
            result = finish(stream)
            assert [p.token_id for p in pieces if p.token_id is not None] == result.token_ids
            assert "".join(p.text for p in pieces) == tok.decode(result.token_ids) == result.text


def test_streamed_text_equals_decoded_answer_with_a_prefix_space_tokenizer(
    model: ReactiveTransformer,
) -> None:
    # Such a tokenizer drops one space at the start of a text only: the stream's windows after
    # the first keep theirs, so words stay apart and the pieces join to the decoded answer.
    spaced = RxTTokenizer.train(synthetic_corpus(2000), vocab_size=1024, prefix_space=True)
    texts = []
    with Engine(model, tokenizer=spaced) as engine:
        for s in range(4):
            stream = engine.conversation(seed=s).send("Hi", max_new_tokens=30, temperature=1.0)
            pieces = list(stream)
            result = finish(stream)
            assert "".join(p.text for p in pieces) == spaced.decode(result.token_ids)
            assert result.text == spaced.decode(result.token_ids)
            texts.append(result.text)
    assert any(" " in t.strip() for t in texts)  # the answers hold spaces between words


def test_answer_ending_at_eos(eos_model: ReactiveTransformer) -> None:
    tok = eos_model.tokenizer
    with Engine(eos_model) as engine:
        results = [
            finish(engine.conversation(seed=s).send("Hi", max_new_tokens=30, temperature=0.9))
            for s in range(6)
        ]
    ended = [r for r in results if r.finish_reason == "eos"]
    assert ended, "no sampled answer reached EOS: retune eos_model"
    for r in ended:
        assert r.token_ids[-1] == tok.eos_id and tok.eos_id not in r.token_ids[:-1]
        assert r.text == tok.decode(r.token_ids)
    for r in results:
        if r.finish_reason != "eos":
            assert r.finish_reason == "length" and len(r.token_ids) == 30


def test_stop_at_eos_false_runs_to_max_new_tokens(eos_model: ReactiveTransformer) -> None:
    with Engine(eos_model) as engine:
        for s in range(4):
            r = finish(engine.conversation(seed=s).send("Hi", max_new_tokens=30, stop_at_eos=False))
            assert r.finish_reason == "length" and len(r.token_ids) == 30


def test_default_sampling_and_overrides(model: ReactiveTransformer) -> None:
    defaults = SamplingParams(max_new_tokens=7, stop_at_eos=False)
    with Engine(model, default_sampling=defaults) as engine:
        conv = engine.conversation(seed=24)
        stm0 = committed(conv)
        result = conv.ask("Hello")
        assert result.finish_reason == "length" and len(result.token_ids) == 7
        assert result.token_ids == reference_answer(model, "Hello", stm0, 7)
        assert len(conv.ask("Hello", max_new_tokens=3).token_ids) == 3  # one field replaced
        explicit = SamplingParams(max_new_tokens=2, stop_at_eos=False)
        assert len(conv.ask("Hello", explicit).token_ids) == 2
        conv.wait(timeout=TIMEOUT)
        timing = conv.last_update
        assert timing is not None
        assert timing.queued_at <= timing.started_at <= timing.finished_at
        assert 0 <= timing.duration_s <= timing.latency_s
        assert conv.turns == 3


# --------------------------------------------------------------------------- 8. bad input
def test_bad_queries_and_sampling_are_refused_before_queueing(model: ReactiveTransformer) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=17)
        limit = model.config.max_seq_len
        with pytest.raises(ValueError, match=f"max_seq_len={limit}"):
            conv.send([20] * limit)
        with pytest.raises(ValueError, match="max_seq_len"):
            conv.send("Hi", max_new_tokens=limit)
        with pytest.raises(ValueError, match="top_p"):
            conv.send("Hi", top_p=2)
        with pytest.raises(ValueError, match="temperature"):
            conv.send("Hi", temperature=-1.0)
        with pytest.raises(ValueError, match="max_new_tokens"):
            conv.send("Hi", max_new_tokens=0)
        with pytest.raises(TypeError, match="top_q"):
            conv.send("Hi", top_q=0.5)
        with pytest.raises(ValueError, match="out of range"):
            conv.send([5, model.config.vocab_size])
        with pytest.raises(ValueError, match="out of range"):
            conv.send([-1])
        assert engine.stats().waiting == 0
        assert not conv.updating
        conv.wait(timeout=1)
        assert conv.turns == 0
        result = finish(conv.send("Hi", max_new_tokens=3))  # still usable
        assert result.turn == 1


def test_engine_construction_is_validated(
    moe_sqa_model: ReactiveTransformer, tok: RxTTokenizer
) -> None:
    assert moe_sqa_model.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(moe_sqa_model)
    with pytest.raises(ValueError, match="the model only 256"):  # tokenizer larger than vocab
        Engine(moe_sqa_model, tok)


def test_engine_batch_sizes_are_validated(model: ReactiveTransformer) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, update_batch_size=0)


def test_closed_engine_refuses_work(model: ReactiveTransformer) -> None:
    engine = Engine(model)
    conv = engine.conversation(seed=18)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        conv.send("Hi")
    with pytest.raises(RuntimeError, match="closed"):
        engine.conversation()


def test_refused_send_leaves_conversation_usable(model: ReactiveTransformer) -> None:
    engine = Engine(model)
    conv = engine.conversation(seed=18)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        conv.send("Hi")
    assert not conv.updating
    conv.wait(timeout=0.5)  # e.g. to export the state of a conversation after shutdown


# --------------------------------------------------------------------------- 9. failures
def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, message: str) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(message)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_failed_memory_update_is_isolated(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Engine(model) as engine:
        recorder = Recorder()
        conv = engine.conversation(seed=19, on_update=recorder)
        other = engine.conversation(seed=20)
        finish(conv.send("My name is Ann.", max_new_tokens=6))
        finish(other.send("Hello", max_new_tokens=6))
        last_good = committed(conv).clone()

        _fail_once(monkeypatch, model, "update_memory", "update boom")
        stream = conv.send("Where do I live?", max_new_tokens=6)
        result = stream.result()  # the answer itself is delivered
        assert result.finish_reason == "length" and len(result.token_ids) == 6
        with pytest.raises(EngineError, match="update boom"):
            stream.wait_update(timeout=TIMEOUT)
        failed = recorder.wait_for("failed", 2)
        assert isinstance(failed.error, RuntimeError)
        assert recorder.kinds()[-2:] == [("started", 2), ("failed", 2)]

        with pytest.raises(EngineError, match="update boom"):
            conv.send("Anything?")
        with pytest.raises(EngineError, match="update boom"):
            conv.wait(timeout=TIMEOUT)
        # No public accessor works while the error is set (stm/export_state re-raise it).
        assert torch.equal(conv._slot.stm, last_good)
        assert conv.turns == 1

        # Other conversations are unaffected.
        stm = committed(other)
        r = finish(other.send("Still there?", max_new_tokens=8))
        assert r.token_ids == reference_answer(model, "Still there?", stm, 8)
        assert_stm_equal(committed(other), replay(model, stm, [("Still there?", r.token_ids)]))


def test_failed_update_does_not_fail_updates_batched_with_it(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = model.update_memory
    poison = 777  # a query id that makes the update raise

    def picky_update(stm: torch.Tensor, ids: torch.Tensor, *rest: Any) -> torch.Tensor:
        if (ids == poison).any():
            raise RuntimeError("cannot encode this interaction")
        return update(stm, ids, *rest)

    monkeypatch.setattr(model, "update_memory", picky_update)
    release = threading.Event()

    def hold(event: UpdateEvent) -> None:
        if event.kind == "started":
            release.wait(TIMEOUT)

    with Engine(model) as engine:
        holder = engine.conversation(seed=25, on_update=hold)
        bad, good = engine.conversation(seed=26), engine.conversation(seed=27)
        stm_good = committed(good)
        holder.send("Hold the updater", max_new_tokens=2).result()  # its update now blocks
        s_bad = bad.send([poison], max_new_tokens=4)
        s_good = good.send("Hello", max_new_tokens=4)
        r_good = s_good.result()
        s_bad.result()
        release.set()  # both updates are queued: they run as one batch
        with pytest.raises(EngineError):
            s_bad.wait_update(timeout=TIMEOUT)
        s_good.wait_update(timeout=TIMEOUT)
        assert_stm_equal(committed(good), replay(model, stm_good, [("Hello", r_good.token_ids)]))


@pytest.mark.parametrize("recovery", ["reset", "load_state"])
def test_failed_memory_update_recovers(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch, recovery: str
) -> None:
    with Engine(model) as engine:
        conv = engine.conversation(seed=21)
        stm0 = committed(conv).clone()
        blob = conv.export_state()
        _fail_once(monkeypatch, model, "update_memory", "update boom")
        stream = conv.send("Hi", max_new_tokens=4)
        with pytest.raises(EngineError):
            stream.wait_update(timeout=TIMEOUT)
        if recovery == "reset":
            conv.reset()
        else:
            conv.load_state(blob)
        assert torch.equal(committed(conv), stm0)
        r = finish(conv.send("Hi again", max_new_tokens=6))
        assert r.token_ids == reference_answer(model, "Hi again", stm0, 6)


def test_decoder_failure_fails_the_turn_and_engine_keeps_serving(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_once(monkeypatch, RowPool, "step", "decoder boom")
    with Engine(model) as engine:
        conv = engine.conversation(seed=22)
        stm0 = committed(conv).clone()
        stream = conv.send("Hello", max_new_tokens=10)
        with pytest.raises(EngineError, match="decoder boom"):
            stream.result()
        conv.wait(timeout=TIMEOUT)  # nothing left in flight; memory not updated
        assert torch.equal(committed(conv), stm0)
        assert conv.turns == 0
        assert engine.stats() == EngineStats(active=0, waiting=0, updates_pending=0)
        # The same and other conversations keep being served, from their committed memory.
        r = finish(conv.send("Hello", max_new_tokens=10))
        assert r.token_ids == reference_answer(model, "Hello", stm0, 10)
        other = engine.conversation(seed=23)
        stm = committed(other)
        r = finish(other.send("Hello", max_new_tokens=10))
        assert r.token_ids == reference_answer(model, "Hello", stm, 10)


def test_wait_update_of_a_failed_turn_returns_promptly(
    model: ReactiveTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_once(monkeypatch, RowPool, "step", "decoder boom")
    with Engine(model) as engine:
        stream = engine.conversation(seed=22).send("Hello", max_new_tokens=10)
        with pytest.raises(EngineError, match="decoder boom"):
            stream.result()
        with pytest.raises(EngineError):
            stream.wait_update(timeout=0.5)


# --------------------------------------------------------------------------- 10. threads
def test_client_threads_equal_sequential_runs(model: ReactiveTransformer) -> None:
    n_clients = 8

    def turns_of(i: int) -> list[tuple[Query, dict[str, Any]]]:
        sampled = {"temperature": 0.9, "top_k": 50} if i % 2 else {}
        return [
            (f"Where does client {i} live?", {"max_new_tokens": 6 + 3 * i, **sampled}),
            ("What colour is the car?" * (1 + i % 3), {"max_new_tokens": 20 - i, **sampled}),
            ([100 + i, 200 + i], {"max_new_tokens": 5 + i % 4, "seed": i, "temperature": 0.8}),
        ]

    with Engine(model, max_batch_size=4) as engine:  # more clients than rows: some queue
        convs = [engine.conversation(seed=100 + i) for i in range(n_clients)]
        baselines = [c.fork() for c in convs]
        got: dict[int, list[list[int]]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(n_clients)

        def client(i: int) -> None:
            try:
                start.wait(TIMEOUT)
                got[i] = [finish(convs[i].send(q, **p)).token_ids for q, p in turns_of(i)]
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        for i, conv in enumerate(baselines):
            want = [finish(conv.send(q, **p)).token_ids for q, p in turns_of(i)]
            assert got[i] == want, f"client {i}"
            assert_stm_equal(committed(convs[i]), committed(conv))
        assert engine.stats().active == 0 and engine.stats().waiting == 0
