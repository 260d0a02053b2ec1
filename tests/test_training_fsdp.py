"""FSDP2 training (``TrainConfig.parallel="fsdp"``): real 2-process torchrun (gloo, CPU) runs
that equal the single-process run with the same effective batch — SMAT with staged unfreezing,
tied embeddings and a parameter only one rank uses; the joint stage on a MoE model with
gradient accumulation — checkpoints in the project's format (full weights, index-keyed
optimiser state), and a resume, under FSDP2 and under DDP, that continues the interrupted run.

Run as a script, this file is the torchrun worker: ``python -m torch.distributed.run
--nproc_per_node 2 tests/test_training_fsdp.py OUT TOKENIZER``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rxt.data import probes
from rxt.tokenizer import RxTTokenizer
from rxt.training import distributed as dist_utils
from rxt.training.loop import TrainConfig, lr_factor, train
from rxt.training.stages.joint import JointConfig, JointStage, interaction_sequences
from rxt.training.stages.smat import ALL_MODULES
from test_training_ddp import (
    DENSE,
    DROPOUT,
    MOE,
    SHORT,
    Crash,
    CrashingStage,
    finish_torchrun,
    launch_torchrun,
    log_lines,
    make_model,
    make_stage,
    make_tokenizer,
    per_process,
    staged_stage,
    weights,
)

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability


# No clipping in the SMAT and dropout runs: see the tolerances in the test.
SMAT = dataclasses.replace(DENSE, grad_clip=0.0)
RESUMED = dataclasses.replace(DROPOUT, grad_clip=0.0)
# The resumed runs unfreeze the encoder and memory attention at step 2, just after the
# checkpoint: parameters without optimiser state there must resume without any.
LATE = ((0, ("decoder", "lm_head", "embed")), (2, ALL_MODULES))


def fsdp(config: TrainConfig, processes: int) -> TrainConfig:
    """``per_process(config, processes)`` trained with FSDP2."""
    return dataclasses.replace(per_process(config, processes), parallel="fsdp")


def joint_stage(tokenizer: RxTTokenizer) -> JointStage:
    dialogues = probes.generate(16, seed=2, config=SHORT)
    sequences = interaction_sequences(dialogues, tokenizer, 64)
    return JointStage(sequences, tokenizer, JointConfig(batch_size=2), name="sft")


class Curve:
    """A do-nothing learning curve: FSDP2 must refuse any evaluator."""

    every = 1

    def __call__(self, model):
        return {}


def read_optimizer(path: Path) -> dict:
    return torch.load(path / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]


# ------------------------------------------------------------------------ the torchrun worker
def worker(out: Path, tokenizer_path: Path) -> None:
    """Each rank: SMAT (staged, tied, rank 1 built with other weights), the joint stage (MoE,
    accumulation), and a dropout run straight vs. interrupted and resumed under FSDP2 and under
    DDP; then the refused set-ups. Rank 0 saves the models; the test compares them."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tokenizer = RxTTokenizer.from_file(tokenizer_path)
    tied = make_model(tie_embeddings=True)
    if rank == 1:  # rank 0's initial weights must reach every rank, as under DDP
        with torch.no_grad():
            for p in tied.parameters():
                p.add_(1.0)
    train(tied, staged_stage(tokenizer), fsdp(SMAT, 2), out / "smat", progress=False)
    context = dist_utils.init_distributed("cpu")  # train() joined the group; this reuses it
    held = sum(p.to_local().numel() for p in tied.parameters())  # the model stays sharded
    total = sum(p.numel() for p in tied.parameters())
    assert sum(dist_utils.all_gather_objects(context, held)) == total
    assert held <= 0.51 * total  # each rank holds its half (rows split, rounded up)
    train(make_model("moe"), joint_stage(tokenizer), fsdp(MOE, 2), out / "joint", progress=False)

    stage = make_stage(tokenizer, LATE)
    straight = make_model(dropout=0.2)
    train(straight, stage, fsdp(RESUMED, 2), out / "straight", progress=False)
    with pytest.raises(Crash):  # both ranks die at step 3, after the step-2 checkpoint
        train(make_model(dropout=0.2), CrashingStage(stage, at=6), fsdp(RESUMED, 2),
              out / "resumed", progress=False)  # fmt: skip
    if rank == 0:
        shutil.copytree(out / "resumed", out / "resumed-ddp")
    dist_utils.barrier(context)
    torch.manual_seed(1234 + rank)  # resume must restore each rank's own RNG stream
    train(make_model(dropout=0.2), stage, fsdp(RESUMED, 2), out / "resumed", resume=True,
          progress=False)  # fmt: skip
    train(make_model(dropout=0.2), stage, per_process(RESUMED, 2), out / "resumed-ddp",
          resume=True, progress=False)  # fmt: skip

    with pytest.raises(ValueError, match="already sharded"):
        train(straight, stage, fsdp(RESUMED, 2), out / "again", progress=False)
    with pytest.raises(ValueError, match=r"TrainConfig\.parallel: 'fsdp' cannot run an evaluator"):
        train(make_model(), stage, fsdp(RESUMED, 2), out / "curve", evaluator=Curve())
    dist_utils.barrier(context)
    dist_utils.destroy_distributed()
    (out / f"rank{rank}.done").touch()


# ------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_parallel_is_validated_and_one_process_fsdp_is_the_single_process_loop(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig\.parallel: must be one of"):
        TrainConfig(steps=1, parallel="zero")
    stage = make_stage(tokenizer)
    config = TrainConfig(steps=2, lr=1e-2, log_every=1)
    plain, sharded = make_model(), make_model()
    train(plain, stage, config, tmp_path / "ddp", progress=False)
    train(sharded, stage, dataclasses.replace(config, parallel="fsdp"), tmp_path / "fsdp",
          progress=False)  # fmt: skip
    expected = plain.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in sharded.state_dict().items())
    assert log_lines(tmp_path / "ddp") == log_lines(tmp_path / "fsdp")


def test_torchrun_fsdp_equals_one_process_and_resumes(tokenizer, tmp_path):
    out = tmp_path / "fsdp"
    launched = launch_torchrun(__file__, out, tokenizer)

    # Meanwhile, the single-process references with the same effective batch.
    single = tmp_path / "single"
    tied = make_model(tie_embeddings=True)
    train(tied, staged_stage(tokenizer), per_process(SMAT, 1), single / "smat", progress=False)
    moe = make_model("moe")
    train(moe, joint_stage(tokenizer), per_process(MOE, 1), single / "joint", progress=False)

    finish_torchrun(launched, timeout=180)
    assert (out / "rank0.done").exists() and (out / "rank1.done").exists()

    # SMAT without clipping: FSDP2 changes no arithmetic. The gathered weights are fresh
    # tensors of the same shapes (every kernel, MKL's GEMMs included, runs as in one process
    # on that CPU), the mean of two ranks' gradients is exact, and AdamW is elementwise on the
    # shards; what differs between x86-64 CPUs is the same in both runs. Measured: bit for bit
    # under every ATen capability (default, AVX2, AVX-512, AMX); 1e-6 as the DDP test. With
    # clipping, the global norm summed from the shards differs in its last bit, and Adam on
    # SMAT's memory chain (linear gates) magnifies that to 5.5e-5-1.1e-4 after four steps
    # (measured under those capabilities), so clipping is checked on the joint run: MoE,
    # 2 ranks x 2 micro-batches vs 1 x 4, whose gradients also sum in another association,
    # ((g0 + g2) + (g1 + g3)) / 4. Adam magnifies that rounding where a gradient is near zero:
    # 1.3e-6-1.8e-6 measured under those capabilities, bound 5e-5 as the DDP test's MoE run,
    # against updates of 1e-2. A lost rank's contribution or a misplaced shard moves weights by
    # ~lr = 1e-2; a wrongly scaled gradient, which Adam would hide, shows in grad_norm (logs).
    never_used = "mlm_head.proj.weight"  # PartlyUnused never touches it (see below)
    for name, reference, atol in (("smat", tied, 1e-6), ("joint", moe, 5e-5)):
        expected = reference.state_dict()
        got = weights(out / name / "model")  # rank 0's gathered save; loads as any model
        assert got.keys() == expected.keys()
        for key, value in got.items():
            if key != never_used or name != "smat":
                torch.testing.assert_close(value, expected[key], rtol=0, atol=atol, msg=key)
        fsdp_log, single_log = log_lines(out / name), log_lines(single / name)
        assert len(fsdp_log) == len(single_log)
        for a, b in zip(fsdp_log, single_log, strict=True):
            assert a.keys() == b.keys() and a["tokens"] == b["tokens"]
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)

    # A trainable parameter no rank used gets a zero gradient under FSDP2 (the single process
    # leaves none): AdamW's decay alone moves it, at the two steps the MLM head trained.
    initial = make_model(tie_embeddings=True).state_dict()[never_used]
    decayed = initial.clone()
    for step in (2, 3):
        decayed.mul_(1 - SMAT.lr * lr_factor(step, SMAT) * SMAT.weight_decay)
    assert torch.equal(tied.state_dict()[never_used], initial)
    torch.testing.assert_close(weights(out / "smat" / "model")[never_used], decayed)

    # The checkpoint is the single process's: full tensors keyed by parameter index, with the
    # same AdamW state, plus the never-used matrix's (zero) moments.
    ours, theirs = read_optimizer(out / "smat"), read_optimizer(single / "smat")
    assert ours["param_groups"] == theirs["param_groups"]
    extra = set(ours["state"]) - set(theirs["state"])
    assert set(theirs["state"]) <= set(ours["state"]) and len(extra) == 1
    (index,) = extra
    assert not ours["state"][index]["exp_avg"].any()
    for i, state in theirs["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][i][key], value, rtol=0, atol=1e-6)

    # Resume: interrupted after the step-2 checkpoint and resumed under FSDP2, the run equals
    # the uninterrupted one bit for bit (each rank's dropout stream restored); resumed from the
    # same checkpoint under DDP, it equals it as the single process does (no clipping: 1e-6).
    straight = weights(out / "straight" / "model")
    resumed, resumed_ddp = (
        weights(out / "resumed" / "model"),
        weights(out / "resumed-ddp" / "model"),
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for key, value in straight.items():
        torch.testing.assert_close(resumed_ddp[key], value, rtol=0, atol=1e-6, msg=key)
    assert log_lines(out / "straight") == log_lines(out / "resumed")
    for a, b in zip(log_lines(out / "resumed-ddp"), log_lines(out / "straight"), strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    state = json.loads((out / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["parallel"] == "fsdp" and state["world_size"] == 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
