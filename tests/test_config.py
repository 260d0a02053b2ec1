"""RxTConfig: validation at construction, presets, JSON round trips (rxt.config)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from rxt import ConfigError, ReactiveTransformer, RxTConfig
from rxt.config import AttentionConfig, DecoderConfig, MemoryConfig, MoEConfig


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_defaults_are_valid() -> None:
    config = RxTConfig()
    assert config.stm_shape == (config.num_layers, config.memory.num_slots, config.d_model)
    assert config.resolved_init_std == pytest.approx(0.8 / math.sqrt(config.d_model))
    assert RxTConfig(init_std=0.02).resolved_init_std == 0.02


# ---------------------------------------------------------------------------- invalid values
def _sqa(h: int, hq: int | None = None, hkv: int | None = None) -> dict[str, Any]:
    return {"num_heads": h, "num_query_heads": hq, "num_kv_heads": hkv}


# (overrides of the tiny preset, substrings the message must contain)
INVALID: dict[str, tuple[dict[str, Any], list[str]]] = {
    "heads do not divide d_model": (
        {"decoder": {"self_attention": _sqa(5)}},
        ["decoder.self_attention.num_heads", "d_model=64"],
    ),
    "heads do not divide d_model (memory)": (
        {"memory": {"attention": _sqa(6)}},
        ["memory.attention.num_heads", "d_model=64"],
    ),
    "query heads > heads": (
        {"memory": {"attention": _sqa(4, 8)}},
        ["memory.attention.num_query_heads", "num_heads=4", "got 8"],
    ),
    "zero query heads": (
        {"decoder": {"cross_attention": _sqa(4, 0)}},
        ["decoder.cross_attention.num_query_heads"],
    ),
    "kv heads > query heads": (
        {"encoder": {"self_attention": _sqa(4, 2, 4)}},
        ["encoder.self_attention.num_kv_heads", "num_query_heads=2", "got 4"],
    ),
    "kv heads do not divide query heads": (
        {"decoder": {"cross_attention": _sqa(8, 4, 3)}},
        ["decoder.cross_attention.num_kv_heads", "must divide num_query_heads=4", "got 3"],
    ),
    "moe top_k > num_experts": (
        {"decoder": {"moe": {"num_experts": 4, "top_k": 5}}},
        ["decoder.moe.top_k", "num_experts=4", "got 5"],
    ),
    "moe zero experts": ({"decoder": {"moe": {"num_experts": 0}}}, ["decoder.moe.num_experts"]),
    "moe negative aux weight": (
        {"decoder": {"moe": {"aux_loss_weight": -0.1}}},
        ["decoder.moe.aux_loss_weight"],
    ),
    "gate_init = 0": ({"memory": {"gate_init": 0.0}}, ["memory.gate_init", "(0, 1)"]),
    "gate_init = 1": ({"memory": {"gate_init": 1}}, ["memory.gate_init", "(0, 1)"]),
    "gate_init > 1": ({"memory": {"gate_init": 1.5}}, ["memory.gate_init"]),
    "gate_init < 0": ({"memory": {"gate_init": -0.2}}, ["memory.gate_init"]),
    "bad variant": ({"memory": {"variant": "foo"}}, ["memory.variant", "'foo'", "interlayer"]),
    "bad gate": ({"memory": {"gate": "sometimes"}}, ["memory.gate", "dynamic"]),
    "bad granularity": ({"memory": {"gate_granularity": "token"}}, ["memory.gate_granularity"]),
    "bad stm_init": ({"memory": {"stm_init": "zeros"}}, ["memory.stm_init", "learned"]),
    "string d_model": ({"d_model": "64"}, ["d_model", "must be an integer", "'64'"]),
    "float d_model": ({"d_model": 64.0}, ["d_model", "must be an integer"]),
    "bool as int": ({"num_layers": True}, ["num_layers", "must be an integer", "True"]),
    "bool as nested int": ({"memory": {"num_slots": False}}, ["memory.num_slots", "integer"]),
    "int as bool": ({"tie_embeddings": 1}, ["tie_embeddings", "true or false"]),
    "string as float": ({"rope_theta": "1e4"}, ["rope_theta", "must be a number"]),
    "bool as float": ({"norm_eps": True}, ["norm_eps", "must be a number"]),
    "nan float": ({"norm_eps": float("nan")}, ["norm_eps", "finite"]),
    "inf float": ({"rope_theta": float("inf")}, ["rope_theta", "finite"]),
    "-inf nested float": ({"memory": {"stm_init_std": float("-inf")}}, ["memory.stm_init_std"]),
    "nan gate_init": ({"memory": {"gate_init": float("nan")}}, ["memory.gate_init", "finite"]),
    "nan init_std": ({"init_std": float("nan")}, ["init_std", "finite"]),
    "zero vocab": ({"vocab_size": 0}, ["vocab_size", "> 0"]),
    "negative layers": ({"num_layers": -1}, ["num_layers", "> 0"]),
    "zero slots": ({"memory": {"num_slots": 0}}, ["memory.num_slots", "> 0"]),
    "zero ffn": ({"encoder": {"ffn_dim": 0}}, ["encoder.ffn_dim", "> 0"]),
    "negative stm std": ({"memory": {"stm_init_std": -0.1}}, ["memory.stm_init_std", ">= 0"]),
    "zero init_std": ({"init_std": 0.0}, ["init_std", "> 0"]),
    "nested not an object": ({"decoder": 3}, ["decoder", "object"]),
    "unknown top-level field": ({"dropuot": 0.1}, ["dropuot", "unknown field", "d_model"]),
    "unknown nested field": (
        {"memory": {"slots": 8}},
        ["memory.slots", "unknown field", "num_slots"],
    ),
    "unknown deep field": (
        {"decoder": {"moe": {"experts": 8}}},
        ["decoder.moe.experts", "unknown field", "num_experts"],
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_config_fails_naming_the_field(case: str) -> None:
    overrides, needles = INVALID[case]
    with pytest.raises(ConfigError) as info:
        RxTConfig.preset("tiny", **overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    # The same dictionary through from_dict fails the same way.
    data = RxTConfig.preset("tiny").to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=re.escape(needles[0])):
        RxTConfig.from_dict(data)


ATTENTIONS = [
    "decoder.self_attention",
    "decoder.cross_attention",
    "encoder.self_attention",
    "memory.attention",
]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_odd_head_width_rejected_for_rope(attention: str) -> None:
    """Every attention applies RoPE somewhere (self-attention: q and k; memory cross-attention:
    decoder queries; memory write: ED keys), so each needs an even head width d/H."""
    outer, inner = attention.split(".")
    # d=64 with 64 heads: head width 1. Query/kv heads stay valid (4 and 2 <= 64).
    with pytest.raises(ConfigError, match=re.escape(f"{attention}.num_heads")) as info:
        RxTConfig.preset("tiny", **{outer: {inner: {"num_heads": 64}}})
    assert "even" in str(info.value) and "RoPE" in str(info.value)
    # An even width (d=64, 16 heads -> 4) is fine, and the model builds.
    config = RxTConfig.preset("tiny", **{outer: {inner: {"num_heads": 16}}})
    ReactiveTransformer(config)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match="d_model"):
        RxTConfig(d_model=66)  # default 4 heads do not divide 66
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="gate_init"):
        MemoryConfig(gate_init=1.0)
    with pytest.raises(ConfigError, match="variant"):
        MemoryConfig(variant="foo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_heads"):
        AttentionConfig(num_heads="4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="decoder"):
        RxTConfig(decoder={"ffn_dim": 8})  # type: ignore[arg-type]  # dict, not DecoderConfig
    with pytest.raises(ConfigError, match="moe"):
        DecoderConfig(moe={"num_experts": 2})  # type: ignore[arg-type]


def test_configs_are_frozen() -> None:
    config = RxTConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 32  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory.num_slots = 8  # type: ignore[misc]


def test_from_dict_rejects_non_object() -> None:
    with pytest.raises(ConfigError, match="expected an object"):
        RxTConfig.from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- presets
def test_preset_names() -> None:
    names = RxTConfig.presets()
    assert {"tiny", "small", "paper-nano"} <= set(names)
    # presets() returns a copy; the registry is not mutated through it.
    names.append("bogus")
    assert "bogus" not in RxTConfig.presets()


def test_paper_nano_matches_published_configuration() -> None:
    c = RxTConfig.preset("paper-nano")
    assert (c.d_model, c.num_layers, c.max_seq_len, c.vocab_size) == (128, 6, 256, 7500)
    for att in (c.decoder.self_attention, c.decoder.cross_attention, c.encoder.self_attention):
        assert (att.num_heads, att.query_heads, att.kv_heads) == (8, 4, 4)  # SQA 4q / 4kv
    assert c.decoder.moe is not None
    assert (c.decoder.moe.num_experts, c.decoder.moe.top_k) == (12, 2)
    assert c.memory.num_slots == 256 and c.stm_shape == (6, 256, 128)
    assert c.memory.variant == "interlayer"


def test_tiny_and_small_are_dense() -> None:
    for name in ("tiny", "small"):
        assert RxTConfig.preset(name).decoder.moe is None, name


def test_preset_overrides_nested_and_revalidated() -> None:
    base = RxTConfig.preset("paper-nano")
    c = RxTConfig.preset("paper-nano", d_model=64, decoder={"moe": {"top_k": 3}})
    assert c.d_model == 64
    assert c.decoder.moe is not None
    assert (c.decoder.moe.num_experts, c.decoder.moe.top_k) == (12, 3)  # sibling kept
    assert c.decoder.moe.expert_dim == base.decoder.moe.expert_dim
    assert c.decoder.self_attention == base.decoder.self_attention  # untouched branch kept
    assert c.memory == base.memory
    # Adding MoE to a dense preset.
    tiny_moe = RxTConfig.preset("tiny", decoder={"moe": {"num_experts": 4, "top_k": 1}})
    assert tiny_moe.decoder.moe == MoEConfig(num_experts=4, top_k=1)
    # A dataclass value works as an override as well as a dict.
    assert RxTConfig.preset("tiny", memory=MemoryConfig(num_slots=8)).memory.num_slots == 8
    # Overrides are validated: d=66 is not divisible by the preset's heads.
    with pytest.raises(ConfigError, match=r"num_heads.*d_model=66"):
        RxTConfig.preset("tiny", d_model=66)
    with pytest.raises(ConfigError, match=r"decoder\.moe\.top_k"):
        RxTConfig.preset("paper-nano", decoder={"moe": {"top_k": 13}})


def test_preset_calls_do_not_share_state() -> None:
    a = RxTConfig.preset("tiny", memory={"num_slots": 4})
    b = RxTConfig.preset("tiny")
    assert a.memory.num_slots == 4 and b.memory.num_slots == 32


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError) as info:
        RxTConfig.preset("huge")
    message = str(info.value)
    assert "'huge'" in message
    for name in RxTConfig.presets():
        assert name in message


# ---------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("name", RxTConfig.presets())
def test_json_round_trip(name: str, tmp_path: Path) -> None:
    config = RxTConfig.preset(name)
    path = config.save(tmp_path)
    assert Path(path) == tmp_path / "config.json"
    data = json.loads(Path(path).read_text())
    assert data["model_type"] == "rxt"
    assert data["d_model"] == config.d_model
    assert RxTConfig.load(tmp_path) == config  # directory
    assert RxTConfig.load(path) == config  # file
    assert RxTConfig.from_dict(config.to_dict()) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left


def test_json_round_trip_non_default_values(tmp_path: Path) -> None:
    config = RxTConfig.preset(
        "tiny",
        tie_embeddings=True,
        mlm_head=False,
        init_std=0.05,
        decoder={"moe": {"num_experts": 3, "top_k": 2, "aux_loss_weight": 0.5}},
        memory={"variant": "gated-self-interlayer", "gate": "static", "gate_init": 0.25},
    )
    config.save(tmp_path)
    loaded = RxTConfig.load(tmp_path)
    assert loaded == config
    assert loaded.decoder.moe == MoEConfig(num_experts=3, top_k=2, aux_loss_weight=0.5)


def test_config_written_before_gate_reference_loads_as_it_was_trained(tmp_path: Path) -> None:
    """rxt 0.1 models gated against the pre-stepped slots; their config.json has no
    ``gate_reference``, and must not silently take today's default."""
    data = RxTConfig.preset("tiny").to_dict()
    del data["memory"]["gate_reference"]
    _write(tmp_path, json.dumps(data))
    assert RxTConfig.load(tmp_path).memory.gate_reference == "pre_step"
    assert RxTConfig.preset("tiny").memory.gate_reference == "previous"  # new models: the paper's


def _write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"d_model": 64,', "not valid JSON"),
        (b"\xff\xfe\x00garbage", None),
        (b"[1, 2, 3]", "expected a JSON object"),
    ],
    ids=["bad-json", "non-utf8", "non-object"],
)
def test_unreadable_config_names_file(tmp_path: Path, content: bytes, match: str | None) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        RxTConfig.load(tmp_path)
    assert str(path) in str(info.value)


def test_load_wrong_model_type_names_file(tmp_path: Path) -> None:
    data = {"model_type": "llama", **RxTConfig.preset("tiny").to_dict()}
    path = _write(tmp_path, json.dumps(data))
    with pytest.raises(ConfigError, match="model_type is 'llama'") as info:
        RxTConfig.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(hidden_size=64), "hidden_size"),
        (lambda d: d["memory"].update(num_slot=8), "memory.num_slot"),
        (lambda d: d["decoder"].update(moe={"num_experts": 2, "top_k": 3}), "decoder.moe.top_k"),
        (lambda d: d.update(d_model="64"), "d_model"),
        (lambda d: d["memory"].update(variant="foo"), "memory.variant"),
    ],
    ids=["unknown", "unknown-nested", "invalid-nested", "wrong-type", "bad-literal"],
)
def test_load_invalid_content_names_file_and_field(tmp_path: Path, mutate, field: str) -> None:
    data = json.loads(RxTConfig.preset("tiny").to_json())
    mutate(data)
    path = _write(tmp_path, json.dumps(data))
    with pytest.raises(ConfigError) as info:
        RxTConfig.load(tmp_path)
    message = str(info.value)
    assert str(path) in message and field in message, message


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        RxTConfig.load(tmp_path)


def test_model_type_may_be_absent(tmp_path: Path) -> None:
    config = RxTConfig.preset("tiny")
    _write(tmp_path, json.dumps(config.to_dict()))
    assert RxTConfig.load(tmp_path) == config


# ---------------------------------------------------------------------------- replace
def test_replace_returns_validated_copy() -> None:
    base = RxTConfig.preset("tiny")
    c = base.replace(d_model=96, memory={"num_slots": 8})
    assert (c.d_model, c.memory.num_slots) == (96, 8)
    assert c.memory.variant == base.memory.variant  # nested siblings kept
    assert c.decoder == base.decoder
    assert (base.d_model, base.memory.num_slots) == (64, 32)  # original unchanged
    assert base.replace() == base
    # Replace a nested object wholesale with a dataclass.
    moe = RxTConfig.preset("paper-nano").replace(decoder=DecoderConfig())
    assert moe.decoder == DecoderConfig()
    # Remove MoE from paper-nano.
    assert RxTConfig.preset("paper-nano").replace(decoder={"moe": None}).decoder.moe is None
    with pytest.raises(ConfigError, match=r"memory\.gate_init"):
        base.replace(memory={"gate_init": 2.0})
    with pytest.raises(ConfigError, match=r"num_heads.*d_model=66"):
        base.replace(d_model=66)
    with pytest.raises(ConfigError, match="unknown field"):
        base.replace(slots=3)
