"""Saving and loading models in the Hugging Face directory layout — safetensors only, never pickle.

A model directory holds ``config.json``, ``model.safetensors`` and, when a tokenizer is attached,
``tokenizer.json``. Loading checks that the tensors in the file are exactly those the config
describes (names and shapes) and reports every mismatch with the file it came from; a truncated
or corrupt file is reported as such instead of surfacing a parser error. Writes go to a temporary
file first and are renamed into place, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rxt.config import CONFIG_FILE, RxTConfig
from rxt.tokenizer import TOKENIZER_FILE, RxTTokenizer

if TYPE_CHECKING:
    from rxt.model.reactive_transformer import ReactiveTransformer

WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = "1"
_PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt")


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message names the file and what is wrong."""


def _state(
    model: ReactiveTransformer, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same storage as embed.weight; stored once
    return state


def _tensors_to_save(
    model: ReactiveTransformer, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in _state(model, state).items()}


def _temp_path(directory: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def save_pretrained(
    model: ReactiveTransformer,
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write every file under a temporary name first and rename them into place only once all
    are complete: an error while writing (disk full, bad tensor) leaves the previous model in
    ``directory`` untouched — its weights *and* its config.json, which must stay a pair.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's,
    gathered whole; as Hugging Face's ``save_pretrained(state_dict=...)``)."""
    tokenizer = model.tokenizer
    if tokenizer is not None:
        # Refuse here rather than write a checkpoint that from_pretrained would reject.
        _check_tokenizer_fits(tokenizer, model.config, ValueError, "the attached")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        tmp = _temp_path(directory, WEIGHTS_FILE)
        staged.append((tmp, directory / WEIGHTS_FILE))
        metadata = {"format": "pt", "rxt_format_version": FORMAT_VERSION}
        save_file(_tensors_to_save(model, state_dict), tmp, metadata=metadata)

        tmp = _temp_path(directory, CONFIG_FILE)
        staged.append((tmp, directory / CONFIG_FILE))
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(model.config.to_json() + "\n")

        if tokenizer is not None:
            tmp = _temp_path(directory, TOKENIZER_FILE)
            staged.append((tmp, directory / TOKENIZER_FILE))
            tokenizer.save(tmp)

        for tmp, final in staged:
            os.replace(tmp, final)
        if tokenizer is None:
            # A tokenizer.json left from an earlier save would be attached to this model on load.
            (directory / TOKENIZER_FILE).unlink(missing_ok=True)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def _check_tokenizer_fits(
    tokenizer: RxTTokenizer, config: RxTConfig, error: type[Exception], where: str
) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise error(
            f"{where} tokenizer has {tokenizer.vocab_size} tokens but the config's vocab_size "
            f"is {config.vocab_size}"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = fh.get_tensor(name)
        return tensors
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: cannot read safetensors data, the file is truncated or corrupt ({exc})"
        ) from None


def _check_tensors(
    path: Path, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    for name in sorted(set(found) & set(expected)):
        if tuple(found[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"{name}: shape {tuple(found[name].shape)} in file, "
                f"{tuple(expected[name].shape)} expected from config.json"
            )
    if problems:
        raise CheckpointError(
            f"{path} does not match its config.json: "
            + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        )


def _short(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _resolve(path: str | os.PathLike, revision: str | None, local_files_only: bool) -> Path:
    """A local directory, or a Hub repo id downloaded (or found in the local cache)."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local}: expected a model directory, found a file")
    text = os.fspath(path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{text}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id=text,
                revision=revision,
                allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, "*.md"],
                local_files_only=local_files_only,
            )
        )
    except Exception as exc:  # hub errors are many types; all mean "not available"
        raise FileNotFoundError(
            f"{text}: not a local directory, and not available from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc})"
        ) from None


def load_pretrained(
    cls: type[ReactiveTransformer],
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> ReactiveTransformer:
    directory = _resolve(path, revision, local_files_only)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [name for name in _PICKLE_FILES if (directory / name).exists()]
        hint = (
            f" (found {pickled[0]}: pickle checkpoints are not loaded, for safety; "
            "convert it to safetensors)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{weights}: no such file{hint}")
    config = RxTConfig.load(directory / CONFIG_FILE)
    found = _read_weights(weights)
    with torch.device("meta"):
        skeleton = cls(config)
    _check_tensors(weights, found, _state(skeleton))

    model = cls(config)
    missing, unexpected = model.load_state_dict(found, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:  # _check_tensors should have caught it
        raise CheckpointError(f"{weights}: state mismatch {missing} {unexpected}")
    tokenizer_file = directory / TOKENIZER_FILE
    if tokenizer_file.is_file():
        model.tokenizer = RxTTokenizer.from_file(tokenizer_file)
        _check_tokenizer_fits(model.tokenizer, config, CheckpointError, f"{tokenizer_file}:")
    model.to(device=device, dtype=dtype)
    return model.eval()


def push_to_hub(
    model: ReactiveTransformer,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload rxt model",
) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
