"""Stateless baselines for RxT's quality comparisons: a parameter-matched Hugging Face
``LlamaForCausalLM`` trained on SMAT's dialogues and token budget, and evaluated with RxT's
protocol, in two modes (:mod:`rxt.baselines.data`):

- ``"full"``: reads the whole gold dialogue history (the usual stateless chat LLM);
- ``"current"``: reads only the current interaction (no memory at all).

Typical use::

    model = build_matched_baseline(rxt_config, tokenizer, train_dialogues, mode="full", seed=0)
    stage = StatelessStage(train_dialogues, tokenizer, "full", batch_size=16, seed=0)
    # rxt.training.stages.stateless
    train(model, stage, TrainConfig(steps=...), out_dir)       # rxt.training.loop
    model, tokenizer = load_baseline(out_dir / "model")        # + tokenizer.json, baseline.json
    report = evaluate_stateless(model, tokenizer, test_dialogues, "full", replies=True)
    # rxt.eval.stateless: scored with RxT's protocol

(:func:`matched_llama_config` + :func:`build_baseline` for other targets or contexts.)

Needs Hugging Face ``transformers`` (the ``bench`` extra).
"""

from rxt.baselines.data import MODES, Mode, full_sequence, reply_prompts, scored_rows
from rxt.baselines.model import (
    BASELINE_FILE,
    MatchedLlama,
    StatelessLlama,
    build_baseline,
    build_matched_baseline,
    llama_parameter_count,
    load_baseline,
    matched_llama_config,
    rxt_parameter_count,
)

__all__ = [
    "BASELINE_FILE",
    "MODES",
    "MatchedLlama",
    "Mode",
    "StatelessLlama",
    "build_baseline",
    "build_matched_baseline",
    "full_sequence",
    "llama_parameter_count",
    "load_baseline",
    "matched_llama_config",
    "reply_prompts",
    "rxt_parameter_count",
    "scored_rows",
]
