"""Dependency-free language check over de, en, es, fr and it.

Why: translated Debian documentation keeps some paragraphs in English (untranslated strings, package
descriptions); labelling those German would poison a language-skewed experiment. Function words
("stopwords") are the cheapest reliable signal for telling these five languages apart on paragraphs of
a sentence or more. A word listed for several languages counts for each with weight 1/(number of
languages it is listed for), so shared words ("la", "de", "in") do not decide alone.
"""

from __future__ import annotations

import re
from collections import Counter


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS: dict[str, frozenset[str]] = {
    "de": _word_set(
        """der die das und ist nicht ein eine einen einem einer eines zu den dem des mit sich auf für von
        im in wird werden wir ich sie es auch als bei oder aus wie wenn nur noch kann können nach über
        unter durch man sind hat haben wurde diese dieser dieses zum zur vom um aber dass daß so schon
        sein seine ihr ihre mehr sehr hier dann doch was wer gibt alle kein keine muss sollte ob oft
        jetzt immer wieder ihnen ihm ihn nichts etwas zwischen gegen ohne weil damit sondern""",
    ),
    "en": _word_set(
        """the and of to is in that it for on with as are be this by or not from an at which you can
        have has was will if but they their there all one more when use used also other such these
        than into only its may should would been were does do how what your we he she his her them
        who any some because about most many then those through while where very just""",
    ),
    "es": _word_set(
        """el la los las de del un una unos unas y es en que por para con no se su sus al lo como más
        pero o este esta estos estas ese esa ser son está están ha han fue muy también hay puede entre
        sin sobre cuando desde todo todos nos le les donde porque cada otro otra otros hasta ya sólo
        solo si hace tiene tienen usted mismo""",
    ),
    "fr": _word_set(
        """le la les de des du un une et est en que qui dans pour pas sur au aux ce cette ces il elle
        ils on nous vous sont être avec par plus ne se sa son ses leur leurs mais ou où comme tout tous
        peut fait été avoir lui même aussi entre sans très dont si bien y avez votre vos cela ceci
        chaque autre l' d' qu' n' c' j' s' m' jusqu' lorsqu' puisqu'""",
    ),
    "it": _word_set(
        """il lo la i gli le di del della dei delle degli un una uno e è in che per con non si sono al
        alla alle ai come più ma o questo questa questi anche ha hanno essere era da dal dalla nel
        nella nei sul sulla può tra fra se perché quando tutto tutti molto solo ci ne sia suo sua loro
        viene ogni altri altro cui ho mi ti lei questo quella quello poi così l' d' dell' nell' sull'
        dall' all' un' c' po'""",
    ),
}
LANGUAGES: tuple[str, ...] = tuple(STOPWORDS)

_WEIGHTS: dict[str, dict[str, float]] = {}
for _lang, _words in STOPWORDS.items():
    for _w in _words:
        _WEIGHTS.setdefault(_w, {})[_lang] = 0.0
for _w, _langs in _WEIGHTS.items():
    for _lang in _langs:
        _langs[_lang] = 1.0 / len(_langs)

_WORD = re.compile(r"[^\W\d_]+'?")
_ELISIONS = frozenset(w for words in STOPWORDS.values() for w in words if w.endswith("'"))


def _words(text: str) -> list[str]:
    """Lower-cased words; an apostrophe stays attached only to elisions such as French "l'"."""
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    return [w if not w.endswith("'") or w in _ELISIONS else w[:-1] for w in words]


def language_scores(text: str) -> dict[str, float]:
    """Weighted fraction of the words of `text` that are function words of each language."""
    words = _words(text)
    scores = dict.fromkeys(LANGUAGES, 0.0)
    if not words:
        return scores
    for word, count in Counter(words).items():
        for lang, weight in _WEIGHTS.get(word, {}).items():
            scores[lang] += weight * count
    return {lang: s / len(words) for lang, s in scores.items()}


def detect_language(
    text: str, *, min_ratio: float = 0.08, min_words: int = 5, min_margin: float = 1.25
) -> str | None:
    """The most likely of the five languages, or None when the evidence is too thin or ambiguous.

    Too thin: fewer than `min_words` words, or the best language's function words make up less than
    `min_ratio` of the words (lists of package names, commands, tables). Ambiguous: the best score is
    less than `min_margin` times the runner-up's (mixed-language sentences, very short quotes).
    """
    if len(_words(text)) < min_words:
        return None
    scores = language_scores(text)
    best, second = sorted(scores.values(), reverse=True)[:2]
    if best < min_ratio or best < min_margin * second:
        return None
    return max(scores, key=scores.__getitem__)
