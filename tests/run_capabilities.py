"""Run the kernel-sensitive tests again under every lower ATen CPU capability of this CPU.

    python tests/run_capabilities.py [PYTEST ARGS...]      # `make test` runs it with `-m numerics`

PyTorch picks its vectorised CPU kernels (``default``, ``avx2``, ``avx512``) from the CPU, and
oneDNN adds AMX on CPUs that have it; half-precision rounding, fused paths and summation orders
differ between them, so a tolerance that passes on one machine can fail on the next. The main
test run covers this CPU's own capability; this script forces each lower one through
``ATEN_CPU_CAPABILITY`` (checked to have taken effect) and runs pytest with the given arguments.
Exits with the first failing run's status.
"""

from __future__ import annotations

import os
import subprocess
import sys

# x86-64 levels, lowest first. Other architectures have only `default` below their own level.
LEVELS = ("default", "avx2", "avx512")


def _capability(env: dict[str, str]) -> str:
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    return subprocess.run(
        [sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def lower_capabilities(native: str) -> list[str]:
    """The capabilities below ``native`` that can be forced (``default`` below any other)."""
    if native in LEVELS:
        return list(LEVELS[: LEVELS.index(native)])
    return ["default"]


def main(pytest_args: list[str]) -> int:
    unforced = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    native = _capability(unforced)
    for level in lower_capabilities(native):
        env = dict(unforced, ATEN_CPU_CAPABILITY=level)
        seen = _capability(env)
        if seen != level:
            print(f"ATEN_CPU_CAPABILITY={level} did not take effect (PyTorch reports {seen})")
            return 1
        print(f"== tests under ATEN_CPU_CAPABILITY={level} (this CPU: {native})", flush=True)
        status = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env).returncode
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
