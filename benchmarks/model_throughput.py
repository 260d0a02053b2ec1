"""Training and decoding throughput of the model presets on one device.

    python benchmarks/model_throughput.py --device cuda --dtype bfloat16 --json out.json

Prints, per preset: training tokens/s (teacher-forced decode over query+answer, update_memory,
backward) and cached decode tokens/s (one new token per step, batch of conversations). Medians of
``--repeats`` timed runs after warm-up. A figure-printing benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rxt import ReactiveTransformer, RxTConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_preset(
    name: str, device: torch.device, dtype: torch.dtype, batch: int, seq: int, repeats: int
) -> dict:
    config = RxTConfig.preset(name)
    model = ReactiveTransformer(config).to(device=device, dtype=dtype)
    ids = torch.randint(8, config.vocab_size, (batch, seq), device=device)
    stm = model.initial_stm(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        out = model.decoder_forward(ids, stm)
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].float().reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1)
        )
        new_stm = model.update_memory(stm, ids)
        loss = loss + new_stm.float().pow(2).mean() * 1e-3
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    t_train = _median_time(train_step, device, repeats)
    model.eval()
    steps = min(64, config.max_seq_len - seq)

    @torch.no_grad()
    def decode_steps() -> None:
        memory = model.memory_kv(stm)
        cache = model.new_kv_cache(batch, capacity=seq + steps)
        logits = model.decode(ids, memory_kv=memory, kv_cache=cache, last_only=True)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = model.decode(
                token, memory_kv=memory, kv_cache=cache, last_only=True, check_inputs=False
            )

    t_decode = _median_time(decode_steps, device, repeats)

    @torch.no_grad()
    def memory_update() -> None:
        model.update_memory(stm, ids)

    t_update = _median_time(memory_update, device, repeats)
    return {
        "preset": name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "seq": seq,
        "train_tokens_per_s": batch * seq / t_train,
        "decode_tokens_per_s": batch * steps / t_decode,
        "memory_update_ms": t_update * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--presets", nargs="+", default=RxTConfig.presets())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [
        bench_preset(p, device, dtype, args.batch, args.seq, args.repeats) for p in args.presets
    ]
    for r in rows:
        print(
            f"{r['preset']:<11} {r['device_name']:<24} {r['dtype']:<9} B={r['batch']} T={r['seq']}"
            f"  train {r['train_tokens_per_s']:>10,.0f} tok/s  decode "
            f"{r['decode_tokens_per_s']:>9,.0f} tok/s  update {r['memory_update_ms']:.2f} ms"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
