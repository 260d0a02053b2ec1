"""What every written result carries and how it is written: the machine and library versions
(:func:`environment`) and an atomic JSON write (:func:`write_json`, never a half-written file).

Used by the benchmarks, ``rxt demo``'s reports and ``rxt data``/``rxt eval`` outputs.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

__all__ = ["environment", "write_json"]


def environment(device: str) -> dict[str, object]:
    """What a reader needs to compare figures: hardware, threads and library versions."""
    info: dict[str, object] = {
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_json(path: str | Path, payload: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
