"""How close each half-precision equivalence test comes to its bound on this CPU.

    python benchmarks/precision_margins.py                      # this CPU's own kernels
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/precision_margins.py

The tests in ``tests/test_precision.py`` and ``tests/test_engine_fast_path.py`` assert that two
paths (cached vs full decoding, fused vs module step) agree to 5% of the logits' scale in bf16
and fp16. Kernels differ between CPUs (AVX2, AVX-512, AMX), so this prints, per check, the
largest difference as a fraction of that bound (1.0 = the test fails), and for the MoE model how
many of the 3 × 24 positions had a routing flip on one path. Uses the tests' own helpers.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_engine_fast_path as fast_path
from rxt import RxTConfig
from test_precision import DENSE_NANO, _cached_and_full, _model, _Routing


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / (0.05 * max(b.abs().max().item(), 1.0))


def cached_vs_full(dtype: torch.dtype) -> dict[str, float | str]:
    name = str(dtype).removeprefix("torch.")
    out: dict[str, float | str] = {}
    for preset, overrides, label in (("tiny", {}, "tiny"), ("paper-nano", DENSE_NANO, "nano")):
        cached, full = _cached_and_full(_model(preset, "cpu", dtype, **overrides), "cpu")
        out[f"cached vs full, {label} dense, {name}"] = _ratio(cached, full)
    model = _model("paper-nano", "cpu", dtype)
    with _Routing(model) as routing:
        cached, full = _cached_and_full(model, "cpu")
    chosen = routing.chosen(3)
    with _Routing(model, chosen[:, :, :24].repeat(1, 1, 2, 1)):
        pinned, _ = _cached_and_full(model, "cpu")
    out[f"cached vs full, nano MoE, same routing, {name}"] = _ratio(pinned, full)
    flipped = (chosen[:, :, :24] != chosen[:, :, 24:]).any(-1).any(0)
    clean = ~flipped.int().cummax(dim=1).values.bool()
    scale = 0.05 * max(full.abs().max().item(), 1.0)
    per_position = (cached - full).abs().amax(dim=-1)
    worst = per_position[clean].max().item() / scale if clean.any() else float("nan")
    out[f"cached vs full, nano MoE, not downstream of a flip, {name}"] = worst
    out[f"  routing flips, {name}"] = (
        f"{int(flipped.sum())} of 72 positions, {int(clean.sum())} clean"
    )
    return out


def fused_bf16() -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for name, decoder in (("tiny", {}), ("cross heads", fast_path.CROSS_HEADS)):
        model = copy.deepcopy(fast_path._build(RxTConfig.preset("tiny", decoder=decoder)))
        model.to(torch.bfloat16)
        for lengths in ((7, 7), (4, 10)):
            prompts = fast_path._prompts(model, lengths)
            stm = torch.cat(fast_path._stms(model, len(prompts)))
            pairs = fast_path.fused_vs_module_logits(model, prompts, stm, fast_path.STEPS)
            scale = max(max(ref.float().abs().max().item() for _, ref in pairs), 1.0)
            out[f"fused vs module step, {name}, rows {lengths}, bf16"] = fast_path._max_diff(
                pairs
            ) / (0.05 * scale)
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    rows = {**cached_vs_full(torch.bfloat16), **cached_vs_full(torch.float16), **fused_bf16()}
    for name, value in rows.items():
        print(f"{name}: {value if isinstance(value, str) else f'{value:.3f} of the bound'}")


if __name__ == "__main__":
    main()
