"""Data-parallel training: gradient accumulation, and real 2-process torchrun (gloo) runs that
equal the single-process run with the same effective batch: staged unfreezing (the DDP wrapper
rebuilt), parameters unused on one rank or on all, MoE with accumulation under ``no_sync``,
rank-0-only writes, and an exact resume with per-rank dropout RNG streams.

Run as a script, this file is the torchrun worker: ``python -m torch.distributed.run
--nproc_per_node 2 tests/test_training_ddp.py OUT TOKENIZER``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_model, moe_sqa_overrides
from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.tokenizer import RxTTokenizer
from rxt.training import distributed as dist_utils
from rxt.training import loop
from rxt.training.loop import CheckpointMismatch, TrainConfig, train
from rxt.training.stages.smat import ALL_MODULES, SmatConfig, SmatStage

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

VOCAB = 464
SHORT = probes.ProbeConfig(max_turns=4, max_distance=3)
# Decoder (and the tied embedding) only for two steps, then everything and the MLM head: frozen
# modules, a DDP wrapper rebuilt mid-run, and (with PartlyUnused) unused trainable parameters.
STAGED = ((0, ("decoder", "lm_head", "embed")), (2, (*ALL_MODULES, "mlm_head")))
DENSE = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, log_every=1, checkpoint_every=2)
MOE = TrainConfig(steps=3, lr=1e-2, log_every=1, grad_accum=2)  # 4 micro-batches a step
DROPOUT = TrainConfig(steps=4, lr=1e-2, log_every=2, checkpoint_every=2)


def make_tokenizer() -> RxTTokenizer:
    texts = [x for d in probes.generate(60, seed=0) for t in d.turns for x in (t.query, t.answer)]
    return RxTTokenizer.train(texts, vocab_size=VOCAB)


def make_stage(tokenizer: RxTTokenizer, unfreeze=((0, ALL_MODULES),)) -> SmatStage:
    data = probes.generate(16, seed=1, config=SHORT)
    return SmatStage(data, tokenizer, SmatConfig(batch_size=2, unfreeze=unfreeze))


def make_model(kind: str = "dense", **overrides) -> ReactiveTransformer:
    if kind == "moe":
        # The MoE bound below (5e-5) is Adam magnifying summation-order rounding where a
        # gradient is near zero; the linear gate's d x d maps add such entries (8.4e-5 measured
        # on embed.weight on an AMD EPYC), so the MoE model keeps the per-feature gate. The
        # dense model runs the default (linear) gate within 1e-6 (bit for bit here).
        overrides = moe_sqa_overrides()
        memory = {**overrides["memory"], "gate_projection": "elementwise"}
        config = RxTConfig.preset(
            "paper-nano", **{**overrides, "memory": memory, "vocab_size": VOCAB}
        )
    else:
        config = RxTConfig.preset("tiny", vocab_size=VOCAB, **overrides)
    return build_model(config)


def per_process(config: TrainConfig, processes: int) -> TrainConfig:
    """The same effective batch (``2 * config.grad_accum`` micro-batches per step) over
    ``processes`` (1 or 2) processes."""
    return dataclasses.replace(config, grad_accum=2 * config.grad_accum // processes)


def log_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ReactiveTransformer.from_pretrained(path).state_dict()


class Crash(Exception):
    pass


class CrashingStage:
    """Delegates to a stage but dies when asked for a batch index >= ``at`` (a killed run)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.name = inner, at, inner.name
        self.varying_calls = inner.varying_calls  # what FSDP2 may shard (test_training_fsdp)

    def trainable(self, model, step):
        return self.inner.trainable(model, step)

    def batch(self, index):
        if index >= self.at:
            raise Crash
        return self.inner.batch(index)

    def loss(self, model, batch):
        return self.inner.loss(model, batch)


class PartlyUnused:
    """SMAT plus a penalty on ``mlm_head.norm`` for even batch indices only, weighted by the
    index (so ranks' gradients differ): under DDP with one micro-batch a step, rank 0 uses that
    weight and rank 1 does not; ``mlm_head.proj`` is never used. Neither may hang DDP, and the
    never-used matrix must get no update (no gradient, so no weight decay)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.varying_calls = inner.varying_calls  # what FSDP2 may shard (test_training_fsdp)

    def trainable(self, model, step):
        return self.inner.trainable(model, step)

    def batch(self, index):
        return index, self.inner.batch(index)

    def loss(self, model, batch):
        index, inner = batch
        loss, metrics = self.inner.loss(model, inner)
        if index % 2 == 0:
            loss = loss + 1e-3 * (index % 4 + 1) * (model.mlm_head.norm.weight - 2).square().sum()
        return loss, metrics


def staged_stage(tokenizer: RxTTokenizer) -> PartlyUnused:
    return PartlyUnused(make_stage(tokenizer, STAGED))


def moe_stage(tokenizer: RxTTokenizer) -> PartlyUnused:
    """Two micro-batches per rank: the MLM-head norm is used in the first (under ``no_sync``)
    and unused in the second, whose backward all-reduces."""
    return PartlyUnused(make_stage(tokenizer, ((0, (*ALL_MODULES, "mlm_head")),)))


# ------------------------------------------------------------------------ the torchrun worker
def worker(out: Path, tokenizer_path: Path) -> None:
    """Each rank: the staged dense run, a MoE run, and a dropout run straight vs. resumed. It
    counts its own checkpoint and model writes, and saves its final weights for the test."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tokenizer = RxTTokenizer.from_file(tokenizer_path)
    writes = {"checkpoint": 0, "model": 0}
    save_checkpoint, save_model = loop.save_checkpoint, ReactiveTransformer.save_pretrained

    def counting_checkpoint(*args, **kwargs):
        writes["checkpoint"] += 1
        return save_checkpoint(*args, **kwargs)

    def counting_model(self, *args, **kwargs):
        writes["model"] += 1
        return save_model(self, *args, **kwargs)

    loop.save_checkpoint = counting_checkpoint
    ReactiveTransformer.save_pretrained = counting_model
    final = {}

    # train() joins the torchrun group itself; later calls reuse it.
    dense = make_model()
    train(dense, staged_stage(tokenizer), per_process(DENSE, 2), out / "dense", progress=False)
    final["dense"] = dense.state_dict()
    context = dist_utils.init_distributed("cpu")
    assert (context.world_size, context.rank) == (2, rank)
    moe = make_model("moe")
    train(moe, moe_stage(tokenizer), per_process(MOE, 2), out / "moe", progress=False)
    final["moe"] = moe.state_dict()

    stage = make_stage(tokenizer)
    straight = make_model(dropout=0.2)
    train(straight, stage, per_process(DROPOUT, 2), out / "straight", progress=False)
    final["straight"] = straight.state_dict()
    with pytest.raises(Crash):  # both ranks die at step 3, after the step-2 checkpoint
        train(make_model(dropout=0.2), CrashingStage(stage, at=6), per_process(DROPOUT, 2),
              out / "resumed", progress=False)  # fmt: skip
    torch.manual_seed(1234 + rank)  # resume must restore each rank's own RNG stream
    resumed = make_model(dropout=0.2)
    train(resumed, stage, per_process(DROPOUT, 2), out / "resumed", resume=True, progress=False)
    final["resumed"] = resumed.state_dict()
    with pytest.raises(CheckpointMismatch, match="grad_accum: 1 -> 2"):
        train(make_model(dropout=0.2), stage, per_process(DROPOUT, 1), out / "resumed",
              resume=True, progress=False)  # fmt: skip
    dist_utils.barrier(context)
    dist_utils.destroy_distributed()
    assert not torch.distributed.is_initialized()

    torch.save({"final": final, "writes": writes}, out / f"rank{rank}.pt")


# ------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    return make_tokenizer()


def test_grad_accum_averages_the_micro_batch_gradients(tokenizer, tmp_path):
    stage = make_stage(tokenizer)
    config = TrainConfig(steps=1, grad_clip=0.0, grad_accum=2, log_every=1)
    trained = make_model()
    result = train(trained, stage, config, tmp_path, progress=False)

    reference = make_model().train()
    losses, tokens, grads = [], 0.0, []
    for index in (0, 1):  # step 0's micro-batches
        reference.zero_grad(set_to_none=True)
        loss, metrics = stage.loss(reference, stage.batch(index))
        loss.backward()
        losses.append(loss.item())
        tokens += metrics["tokens"]
        grads.append({n: p.grad for n, p in reference.named_parameters() if p.grad is not None})
    trained_grads = {n: p.grad for n, p in trained.named_parameters() if p.grad is not None}
    assert trained_grads.keys() == grads[0].keys() == grads[1].keys()
    for name, grad in trained_grads.items():  # the last step's gradients stay on the model
        mean = (grads[0][name] + grads[1][name]) / 2
        torch.testing.assert_close(grad, mean, rtol=1e-6, atol=1e-8, msg=name)
    assert result["loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert result["tokens"] == int(tokens)


def test_grad_accum_is_validated_and_fixed_on_resume(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig\.grad_accum"):
        TrainConfig(steps=1, grad_accum=0)
    stage = make_stage(tokenizer)
    one, two = TrainConfig(steps=1), TrainConfig(steps=2)
    train(make_model(), stage, one, tmp_path, progress=False)
    with pytest.raises(CheckpointMismatch, match="grad_accum: 1 -> 2"):
        train(make_model(), stage, dataclasses.replace(two, grad_accum=2), tmp_path,
              resume=True, progress=False)  # fmt: skip

    directory = tmp_path / "checkpoint"
    state = json.loads((directory / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and "python_rng_ranks" not in state
    payload = torch.load(directory / "optimizer.pt", weights_only=True)
    assert "rng_ranks" not in payload

    def rewrite(state, payload):
        (directory / "trainer_state.json").write_text(json.dumps(state))
        torch.save(payload, directory / "optimizer.pt")

    # Written by two processes: this single process may not resume it.
    rank_state = {**state, "world_size": 2, "python_rng_ranks": [state["python_rng"]] * 2}
    rewrite(rank_state, {**payload, "rng_ranks": [payload["rng"]] * 2})
    with pytest.raises(CheckpointMismatch, match="written by 2 process"):
        train(make_model(), stage, two, tmp_path, resume=True, progress=False)
    rewrite({**state, "world_size": 2}, payload)
    with pytest.raises(CheckpointMismatch, match="per-rank RNG states"):
        train(make_model(), stage, two, tmp_path, resume=True, progress=False)

    # A checkpoint written before grad_accum and world_size existed resumes as 1 and 1.
    legacy = {k: v for k, v in state.items() if k != "world_size"}
    legacy["config"] = {k: v for k, v in state["config"].items() if k != "grad_accum"}
    rewrite(legacy, payload)
    assert train(make_model(), stage, two, tmp_path, resume=True, progress=False)["step"] == 2


def test_single_process_context_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = dist_utils.init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main, context.distributed) == (
        0,
        1,
        True,
        False,
    )
    assert dist_utils.all_reduce_sum(context, [1.5, 2]) == [1.5, 2.0]
    assert dist_utils.all_gather_objects(context, {"a": 1}) == [{"a": 1}]
    dist_utils.barrier(context)
    dist_utils.destroy_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        dist_utils.init_distributed("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_torchrun(script: str, out: Path, tokenizer: RxTTokenizer) -> subprocess.Popen:
    """``script OUT TOKENIZER`` (a test file's worker) as a 2-process torchrun job on loopback,
    one CPU thread each; ``out`` is created and the tokenizer saved beside it."""
    out.mkdir()
    tokenizer_path = out.parent / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        script, str(out), str(tokenizer_path),
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_torchrun(launched: subprocess.Popen, timeout: float) -> None:
    """Wait for a :func:`launch_torchrun` job; fail with its output if it failed or hung."""
    try:
        output, _ = launched.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launched.terminate()  # torchrun passes SIGTERM on to its workers
        output, _ = launched.communicate(timeout=30)
        pytest.fail(f"torchrun timed out:\n{output.decode(errors='replace')[-4000:]}")
    assert launched.returncode == 0, output.decode(errors="replace")[-4000:]


def test_torchrun_two_processes_equal_one_process_with_grad_accum(tokenizer, tmp_path):
    ddp = tmp_path / "ddp"
    launched = launch_torchrun(__file__, ddp, tokenizer)

    # Meanwhile, the single-process references: two micro-batches per step.
    single = tmp_path / "single"
    dense = make_model()
    train(dense, staged_stage(tokenizer), per_process(DENSE, 1), single / "dense", progress=False)
    moe = make_model("moe")
    train(moe, moe_stage(tokenizer), per_process(MOE, 1), single / "moe", progress=False)

    finish_torchrun(launched, timeout=120)
    ranks = [torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Only rank 0 wrote: checkpoints of dense (2), moe (1), straight (2), crashed (1) and
    # resumed (1); out_dir/model of the four runs that finished (a checkpoint also saves one).
    assert ranks[0]["writes"] == {"checkpoint": 7, "model": 4 + 7}
    assert ranks[1]["writes"] == {"checkpoint": 0, "model": 0}

    # Dense, 2 x 1 micro-batches vs 1 x 2: the same sums, so equal up to float rounding (equal
    # bit for bit on CPU here). MoE, 2 x 2 vs 1 x 4: the gradient sums associate differently,
    # ((g0 + g1) + (g2 + g3)) vs (((g0 + g1) + g2) + g3), and Adam's normalisation magnifies that
    # rounding where a gradient is near zero: a few 1e-6 after three steps, against updates of
    # 2e-2, hence the looser bound.
    for name, reference, atol in (("dense", dense, 1e-6), ("moe", moe, 5e-5)):
        expected = reference.state_dict()
        replicas = [rank["final"][name] for rank in ranks]
        assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in expected)  # in sync
        for key, value in weights(ddp / name / "model").items():  # what rank 0 saved
            torch.testing.assert_close(replicas[0][key], value, rtol=0, atol=0, msg=key)
            torch.testing.assert_close(value, expected[key], rtol=0, atol=atol, msg=key)
        ddp_log, single_log = log_lines(ddp / name), log_lines(single / name)
        assert [x["step"] for x in ddp_log] == list(range(1, len(ddp_log) + 1))
        assert len(ddp_log) == len(single_log)
        for a, b in zip(ddp_log, single_log, strict=True):
            assert a.keys() == b.keys() and a["tokens"] == b["tokens"]
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)

    # Staged unfreezing under DDP: the encoder trained only from step 2 (after the re-wrap).
    initial = make_model().state_dict()
    encoder = [k for k in initial if k.startswith("encoder.")]
    assert any(not torch.equal(ranks[0]["final"]["dense"][k], initial[k]) for k in encoder)
    # The MLM head: its norm used on some micro-batches only (trained), its matrix never
    # (untouched: no gradient, so not even weight decay).
    for name in ("dense", "moe"):
        initial, trained = make_model(name).state_dict(), ranks[0]["final"][name]
        assert not torch.equal(trained["mlm_head.norm.weight"], initial["mlm_head.norm.weight"])
        assert torch.equal(trained["mlm_head.proj.weight"], initial["mlm_head.proj.weight"])

    # Dropout: per-rank RNG streams, saved and restored per rank, make resume exact.
    for rank in ranks:
        straight, resumed = rank["final"]["straight"], rank["final"]["resumed"]
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert log_lines(ddp / "straight") == log_lines(ddp / "resumed")
    state = json.loads((ddp / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["python_rng_ranks"]) == 2
    assert state["python_rng_ranks"][0] != state["python_rng_ranks"][1]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
