"""`rxt demo`: an end-to-end run of the RxT event cycle on an untrained model.

What it shows today: a tokenizer trained from scratch, a model saved and re-loaded in the Hugging
Face layout, and a conversation run turn by turn — prompt phase, cached generation, memory update —
with the figures that matter for RxT printed per turn: the decoder's prompt stays the size of the
current query, so time to first token and reply time stay flat, while a stateless model's prompt
(the whole history) grows every turn. The model is untrained, so its answers are noise; the
training curriculum replaces this with a trained model.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch

from rxt.config import RxTConfig
from rxt.generation import iter_greedy
from rxt.model.cost import turn_cost
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer

_NAMES = ["Ada", "Bo", "Cleo", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jun"]
_THINGS = ["dog", "cat", "car", "boat", "garden", "kite", "lamp", "violin", "bicycle", "tent"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "white", "teal", "gold", "black"]
_PLACES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Tartu", "Lima", "Kyoto", "Bern"]


def synthetic_corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """Small generated text for the demo tokenizer (no data download is possible or needed)."""
    rng = random.Random(seed)
    templates = [
        "My name is {n} and I live in {p}.",
        "The {t} is {c}.",
        "What colour is the {t}? It is {c}.",
        "{n} bought a {c} {t} in {p}.",
        "Where does {n} live? In {p}.",
        "Tell me about the {t}, please.",
    ]
    return [
        rng.choice(templates).format(
            n=rng.choice(_NAMES),
            t=rng.choice(_THINGS),
            c=rng.choice(_COLOURS),
            p=rng.choice(_PLACES),
        )
        for _ in range(num_sentences)
    ]


def run_demo(
    out: str | Path,
    *,
    preset: str = "small",
    turns: int = 8,
    answer_tokens: int = 24,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)

    print(f"[1/4] training a byte-level BPE tokenizer on generated text (preset {preset})")
    config = RxTConfig.preset(preset)
    corpus = synthetic_corpus(4000, seed)
    tokenizer = RxTTokenizer.train(corpus, vocab_size=min(config.vocab_size, 1024))

    print("[2/4] building the model and saving it in the Hugging Face layout")
    model = ReactiveTransformer(config)
    model.tokenizer = tokenizer
    counts = model.parameter_counts()
    print(
        f"      parameters: total {counts['total']:,}, inference {counts['inference']:,}, "
        f"active per token {counts['active_per_token']:,}"
    )
    model_dir = out / "rxt"
    model.save_pretrained(model_dir)
    model = ReactiveTransformer.from_pretrained(model_dir)  # prove the artifact round-trips
    print(f"      saved and re-loaded {model_dir}/ (config.json, model.safetensors, tokenizer)")

    print(f"[3/4] a {turns}-turn conversation, one event per turn (untrained: answers are noise)")
    rng = random.Random(seed + 1)
    stm = model.initial_stm(1, generator=torch.Generator().manual_seed(seed))
    records = []
    history_tokens = 0
    header = (
        f"{'turn':>4} {'prompt':>6} {'answer':>6} {'ttft ms':>8} {'reply ms':>9} "
        f"{'update ms':>9} {'STM rms':>7} {'stateless prompt':>16}"
    )
    # One untimed turn first, so turn 1 does not pay for first-call allocations.
    warm = torch.tensor([tokenizer.encode_query(corpus[0])])
    warm_answer = list(iter_greedy(model, warm, stm, max_new_tokens=answer_tokens, eos_id=-1))
    with torch.no_grad():
        model.update_memory(stm, torch.cat([warm, torch.tensor([warm_answer])], dim=1))
    print(header)
    for turn in range(1, turns + 1):
        query = f"{rng.choice(corpus)} {rng.choice(corpus)}"
        prompt = torch.tensor([tokenizer.encode_query(query)])
        start = time.perf_counter()
        answer, ttft = [], 0.0
        for token in iter_greedy(
            model, prompt, stm, max_new_tokens=answer_tokens, eos_id=tokenizer.eos_id
        ):
            if not answer:
                ttft = time.perf_counter() - start
            answer.append(token)
        reply = time.perf_counter() - start
        interaction = torch.cat([prompt, torch.tensor([answer])], dim=1)
        start = time.perf_counter()
        with torch.no_grad():
            stm = model.update_memory(stm, interaction)
        update = time.perf_counter() - start
        history_tokens += interaction.shape[1]
        stateless_prompt = history_tokens - len(answer)  # all earlier turns + this query
        record = {
            "turn": turn,
            "prompt_tokens": prompt.shape[1],
            "answer_tokens": len(answer),
            "ttft_s": ttft,
            "reply_s": reply,
            "memory_update_s": update,
            "stm_rms": float(stm.float().pow(2).mean().sqrt()),
            "stateless_prompt_tokens": stateless_prompt,
            "answer": tokenizer.decode(answer),
        }
        records.append(record)
        print(
            f"{turn:>4} {record['prompt_tokens']:>6} {record['answer_tokens']:>6} "
            f"{ttft * 1e3:>8.1f} {reply * 1e3:>9.1f} {update * 1e3:>9.1f} "
            f"{record['stm_rms']:>7.3f} {stateless_prompt:>16}"
        )

    print("[4/4] summary")
    q_len, a_len = records[0]["prompt_tokens"], answer_tokens
    cost = turn_cost(config, q_len, a_len)
    summary = {
        "preset": preset,
        "parameters": counts,
        "turns": records,
        "median_ttft_s": statistics.median(r["ttft_s"] for r in records),
        "median_reply_s": statistics.median(r["reply_s"] for r in records),
        "median_memory_update_s": statistics.median(r["memory_update_s"] for r in records),
        "analytic_turn_flops": cost.to_dict(),
        "note": "untrained model: timings and state handling are real, answers are noise",
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"      median time to first token {summary['median_ttft_s'] * 1e3:.1f} ms, "
        f"reply {summary['median_reply_s'] * 1e3:.1f} ms, memory update "
        f"{summary['median_memory_update_s'] * 1e3:.1f} ms; the stateless prompt grew to "
        f"{records[-1]['stateless_prompt_tokens']} tokens while RxT's stayed at the query size"
    )
    print(f"      per-turn FLOPs ({q_len}-token query, {a_len}-token answer): {cost.to_dict()}")
    print(f"      wrote {out / 'demo.json'} and {model_dir}/")
    return summary
