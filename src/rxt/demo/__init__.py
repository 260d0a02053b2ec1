"""`rxt demo`: the end-to-end job (data, curriculum, baselines, evaluation, report)."""

from rxt.demo.pipeline import run_demo

__all__ = ["run_demo"]
