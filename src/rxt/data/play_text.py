"""A play's text to its speeches (speaker, text, act, scene): the two Gutenberg layouts.

:func:`parse_play` reads the modern-spelling layout (the speaker alone on a line, the speech
below it, directions in brackets) and the First Folio layout (an indented ``"  Philo. Nay,
but ..."`` opens a speech, directions are unindented lines); :mod:`rxt.data.shakespeare` finds
the texts and turns the speeches into dialogues.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Format", "Speech", "parse_play"]

Format = Literal["auto", "modern", "folio"]


@dataclass(frozen=True)
class Speech:
    """One speech. ``act``/``scene`` are the numbers of the current headings (``None`` where the
    text has none, e.g. a prologue); ``section`` counts headings from 0 and changes at every
    act, scene, prologue or epilogue boundary, numbered or not."""

    speaker: str
    text: str
    act: int | None = None
    scene: int | None = None
    section: int = 0


# --------------------------------------------------------------------------- parsing

_WS = re.compile(r"\s+")
_ROMAN = re.compile(r"^[IVXL]+$")
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
}  # fmt: skip
# Latin ordinals of the Folio headings, by stem: Primus/Prima, Secundus/Secunda, Octaua, ...
_LATIN = (
    ("prim", 1), ("secund", 2), ("terti", 3), ("quart", 4), ("quint", 5), ("sext", 6),
    ("septim", 7), ("octa", 8), ("non", 9), ("decim", 10),
)  # fmt: skip
_NUM = r"[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth"
_MODERN_ACT = re.compile(rf"^(?:ACT|Act)\s+({_NUM})\b\.?(?:\s*(?:SCENE|Scene)\s+({_NUM})\b)?")
_MODERN_SCENE = re.compile(rf"^(?:SCENE|Scene)\s+({_NUM})\b")
_FOLIO_ACT = re.compile(r"^Actus\s+([A-Za-z]+)\b(?:[.,:;]?\s*Sc[aeo]*ena\s+([A-Za-z]+))?")
_FOLIO_SCENE = re.compile(r"^(?:Sc[aeo]*ena|Scæna)\s+([A-Za-z]+)\b")
_SECTION = re.compile(
    r"^(?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION|PROLOGVE|EPILOGVE|INDVCTION|Prologue|Epilogue"
    r"|Induction)\.?$"
)
_END = re.compile(r"^(?:THE END\b|FINIS\b|(?:The )?[Nn]ames of (?:all )?the Actors)")
_FINIS_ACT = re.compile(r"^Finis,?\s+Actus\b")
# Stage directions that are not bracketed: always at the start of a line (both formats) ...
_DIRECTION = re.compile(
    r"^(?:(?:Enter|Enters|Re-enter|Reenter)(?=\s*(?:\.|$)|\s+(?:[A-Z]|(?:a|an|the|two|three|four"
    r"|five|six|diuers|divers|seuerall|several|certaine|certain|at|with|in|aloft|aboue|above"
    r"|below|old|yong|young|one|another|on|from|vpon|upon|as|after|before|behind)\b))"
    r"|(?:Exit|Exeunt|Ex|Manet|Manent|Flourish|Florish|Alarum|Alarums|Alarm|Sennet|Senet|Hoboyes"
    r"|Hautboys|Tucket|Excursions|Dead March|A (?:long )?[Ff]lourish|Trumpets sound"
    r"|Sound (?:a|Trumpets|Drums|Flourish))(?![\w-]))"
)
# ... or, at the start of a paragraph, a short line of business ("They fight.", "Song.").
_BUSINESS = re.compile(
    r"^(?:(?:He|She|They|Both|All|The|A|An)\s+\S+.*|Song|Musicke|Musick|Music|Thunder"
    r"|Knock|Knocke|Knocks|Dyes|Dies|Sings|Reades|Reads|Drum|Drumme|Drummes|March|Storme"
    r"|Trumpets|Trumpet|Cornets|Shout|Strikes|Stabs|Killes|Kills|Fight|Fights|Sleepes"
    r"|Letter|A Letter|The Letter|Noyse|Noise|Clocke strikes|Winde|Sound)\b.*$"
)
_CONNECTORS = frozenset({"and", "of", "the", "&", "&c", "&c.", "de", "le", "la"})
_NOT_SPEAKERS = frozenset({"song", "the song", "finis", "the end"})
# Modern: "HAMLET." / "Ham." / "First Lord." / "THESEUS" on a line of its own, or
# "OFFICER. Good sir, be patient." with the speech on the same line (all-caps labels only).
_MODERN_LABEL = re.compile(r"^[A-Z0-9][A-Za-z0-9'&,. -]*$")
_MODERN_INLINE = re.compile(r"^([A-Z][A-Z'&-]+(?:\s[A-Z][A-Z'&-]+){0,3})\.\s+(\S.*)$")
# Folio: an indented line opens a speech: "  Philo. Nay, but ...", "  1.Gent. You do not ...",
# "  Ch.Iust. And so ...", "  Master: Bote-swaine", "  1. When shall we three ...".
_FOLIO_LABEL = re.compile(
    r"^[ \t]+((?:\d\s?\.?\s?)?[A-Z][^\s.:,;?!]*(?:[ .][A-Za-z0-9][^\s.:,;?!]*){0,2})"
    r"\s?[.:](?:\s+|$)(.*)$"
)
_FOLIO_NUMBERED = re.compile(r"^[ \t]+(\d\s?\.?\s?[A-Z][a-z]*)\.(?:\s+|$)(.*)$")
_FOLIO_NUMBER = re.compile(r"^[ \t]+(\d)\s?\.?\s+(\S.*)$")
_FOLIO_BARE = re.compile(r"^[ \t]+([A-Z][a-z]{1,5})\s+(\S.*)$")


def _number(token: str | None) -> int | None:
    if not token:
        return None
    if token.isdigit():
        return int(token)
    if _ROMAN.match(token):
        values = {"I": 1, "V": 5, "X": 10, "L": 50}
        total = 0
        for i, ch in enumerate(token):
            value = values[ch]
            nxt = values[token[i + 1]] if i + 1 < len(token) else 0
            total += -value if value < nxt else value
        return total
    lower = token.lower()
    if lower in _ORDINALS:
        return _ORDINALS[lower]
    for stem, value in _LATIN:
        if lower.startswith(stem):
            return value
    return None


@dataclass
class _State:
    speeches: list[Speech]
    act: int | None = None
    scene: int | None = None
    section: int = 0
    speaker: str | None = None
    lines: list[str] | None = None

    def flush(self) -> None:
        if self.speaker is not None and self.lines:
            text = _WS.sub(" ", " ".join(self.lines)).strip()
            if text:
                self.speeches.append(Speech(self.speaker, text, self.act, self.scene, self.section))
        self.lines = [] if self.speaker is not None else None

    def start(self, speaker: str, first: str = "") -> None:
        self.flush()
        self.speaker = _WS.sub(" ", speaker).strip().rstrip(".:").strip()
        self.lines = [first] if first else []

    def add(self, line: str) -> None:
        if self.speaker is not None and self.lines is not None:
            self.lines.append(line)

    def boundary(self, act: int | None, scene: int | None, *, new_act: bool) -> None:
        self.flush()
        self.speaker, self.lines = None, None
        if new_act:
            self.act, self.scene = act, scene
        else:
            self.scene = scene
        self.section += 1


def _heading(line: str, folio: bool) -> tuple[bool, int | None, int | None] | None:
    """``(new_act, act, scene)`` when ``line`` is an act/scene/prologue heading."""
    if folio:
        if m := _FOLIO_ACT.match(line):
            return True, _number(m.group(1)), _number(m.group(2))
        if m := _FOLIO_SCENE.match(line):
            return False, None, _number(m.group(1))
    else:
        if m := _MODERN_ACT.match(line):
            return True, _number(m.group(1)), _number(m.group(2))
        if m := _MODERN_SCENE.match(line):
            return False, None, _number(m.group(1))
    if _SECTION.match(line) or _FINIS_ACT.match(line):
        return False, None, None
    return None


def _strip_brackets(paragraph: str) -> str:
    """Remove bracketed stage directions (``[Exit.]``, ``{Aside.]``, nested, multi-line) from
    one paragraph. An unclosed ``[`` at the start of a line runs to the end of the paragraph,
    elsewhere to the end of its line; a stray ``]`` ends a direction begun in the previous
    paragraph unless what precedes it on its line is a heading or a speaker label."""
    text = paragraph.replace("{", "[").replace("}", "]")
    while True:
        stripped = re.sub(r"\[[^\[\]]*\]", " ", text)
        if stripped == text:
            break
        text = stripped
    if "[" in text:
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if "[" in line:
                if line.lstrip().startswith("["):
                    lines = lines[:i]
                    break
                lines[i] = line[: line.index("[")]
        text = "\n".join(lines)
    while "]" in text:
        before, after = text.split("]", 1)
        last = before.rsplit("\n", 1)[-1].strip()
        keep = _heading(last, folio=False) or _modern_label(last)
        text = before + after if keep else after
    return text


def _modern_label(line: str) -> bool:
    if len(line) > 40 or not _MODERN_LABEL.match(line) or _ROMAN.match(line.rstrip(".")):
        return False
    if line.lower().rstrip(".") in _NOT_SPEAKERS or _heading(line, folio=False):
        return False
    words = line.replace(",", " ").split()
    if not 1 <= len(words) <= 5 or not any(c.isalpha() for c in line):
        return False
    if not (line.endswith(".") or line.upper() == line):
        return False
    return all(w[0].isupper() or w[0].isdigit() or w.lower() in _CONNECTORS for w in words)


def _is_direction(line: str, *, paragraph_start: bool) -> bool:
    if _DIRECTION.match(line):
        return True
    # Business reads like a sentence of its own: "They fight." -- not "The clocke vpbraides me
    # with the waste of time:", a speech going on after "Clocke strikes."
    words = len(line.split())
    if not paragraph_start or words > 12 or not (line.endswith(".") or words <= 3):
        return False
    return bool(_BUSINESS.match(line))


def _parse_modern(text: str) -> list[Speech]:
    state = _State([])
    started = False
    for raw in re.split(r"\n[ \t]*\n", text):
        lines = [ln.strip() for ln in _strip_brackets(raw).split("\n")]
        lines = [ln for ln in lines if ln]
        if not lines:
            continue
        if _END.match(lines[0]):
            break
        first = True  # the next line is the paragraph's first after any heading
        for line in lines:
            if (head := _heading(line, folio=False)) is not None:
                state.boundary(head[1], head[2], new_act=head[0])
                started, first = True, True
                continue
            if not started:
                continue
            if first:
                first = False
                if _modern_label(line):
                    state.start(line)
                    continue
                m = _MODERN_INLINE.match(line)
                if m and _modern_label(m.group(1) + "."):
                    state.start(m.group(1), m.group(2))
                    continue
                if _DIRECTION.match(line):
                    break  # an unbracketed direction ("Dead March. Enter ..."): skip it whole
            state.add(line)
    state.flush()
    return state.speeches


def _folio_labels(lines: list[str]) -> set[str]:
    """Bare labels ("Caes You may see ...", Antony and Cleopatra's lost full stop) used at least
    three times: real speakers, not the first word of an indented song line."""
    counts: dict[str, int] = {}
    for line in lines:
        if not _FOLIO_LABEL.match(line) and (m := _FOLIO_BARE.match(line)):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return {label for label, n in counts.items() if n >= 3}


def _folio_label(line: str, bare: set[str]) -> tuple[str | None, str]:
    """``(speaker, rest of the line)`` for an indented line that opens a speech."""
    m = _FOLIO_LABEL.match(line)
    if m and len(m.group(1).split()) == 1:
        return m.group(1), m.group(2)
    b = _FOLIO_BARE.match(line)
    if b and b.group(1) in bare:  # "Caes Welcome Publius." is Caesar, not "Caes Welcome Publius"
        return b.group(1), b.group(2)
    if m and len(m.group(1).split()) <= 3 and not m.group(1)[0].isdigit():
        return m.group(1), m.group(2)
    if n := _FOLIO_NUMBER.match(line):  # "2 And I shall." is the second speaker
        if d := _FOLIO_NUMBERED.match(line):
            return d.group(1), d.group(2)  # "2 Cit.", "1. Citizen."
        return n.group(1), n.group(2)
    if m and len(m.group(1).split()) <= 3:
        return m.group(1), m.group(2)
    return None, ""


def _parse_folio(text: str) -> list[Speech]:
    # "L[ord]." and "M[aster]" are editorial expansions in the Folio texts: keep the letters.
    text = re.sub(r"(?<=[A-Za-z])\[([a-z]+)\]", r"\1", text)
    lines = text.split("\n")
    bare = _folio_labels(lines)
    state = _State([])
    in_direction = False
    paragraph_start = True
    for line in lines:
        if not line.strip():
            in_direction, paragraph_start = False, True
            continue
        starts, paragraph_start = paragraph_start, False
        stripped = line.strip()
        if _END.match(stripped) and not line[0].isspace():
            break
        if not line[0].isspace() and (head := _heading(stripped, folio=True)) is not None:
            state.boundary(head[1], head[2], new_act=head[0])
            in_direction = False
            continue
        if line[0].isspace():
            label, rest = _folio_label(line, bare)
            if label is not None and label.lower() not in _NOT_SPEAKERS:
                state.start(label, rest.strip())
                in_direction = False
                continue
            stripped = line.strip()
        if _is_direction(stripped, paragraph_start=starts):
            in_direction = True
            continue
        if not in_direction:
            state.add(stripped)
    state.flush()
    return state.speeches


def _detect_folio(text: str) -> bool:
    """Folio when indented speaker lines outnumber modern speaker paragraphs."""
    lines = text.split("\n")
    folio = sum(1 for line in lines if _FOLIO_LABEL.match(line) or _FOLIO_NUMBER.match(line))
    modern = 0
    for block in re.split(r"\n[ \t]*\n", text):
        first = block.strip().split("\n", 1)[0].strip()
        if (
            _modern_label(first)
            and not _DIRECTION.match(first)
            and not _END.match(first)
            and _heading(first, folio=True) is None
        ):
            modern += 1
    return folio > modern


def parse_play(text: str, *, fmt: Format = "auto") -> list[Speech]:
    """The speeches of a play, in order.

    ``fmt="modern"`` reads the Gutenberg modern-spelling layout (the speaker alone on a line, the
    speech below it, directions in brackets), ``"folio"`` the First Folio layout (an indented
    ``"  Philo. Nay, but ..."`` opens a speech, directions are unindented lines); ``"auto"``
    picks the one whose speaker pattern matches more often. Text before the first act or scene
    heading (title, cast list) and after the end (``THE END``, ``FINIS``, the Folio's list of
    actors) is ignored. Verse lines are joined with single spaces; speeches left empty once their
    directions are gone are dropped."""
    if fmt not in ("auto", "modern", "folio"):
        raise ValueError(f"fmt: must be 'auto', 'modern' or 'folio', got {fmt!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    folio = _detect_folio(text) if fmt == "auto" else fmt == "folio"
    return _parse_folio(text) if folio else _parse_modern(text)
