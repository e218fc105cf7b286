"""Text extraction, cleaning, the language check and the sample-corpus pipeline on a fake package tree."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_prep import sample_corpus
from data_prep.clean import ParagraphFilter, dedup_key, normalize_paragraph
from data_prep.langcheck import detect_language, language_scores
from data_prep.sources import C4Source, iter_texts
from data_prep.textextract import fortune_entries, html_sections

SENTENCES = {
    "de": "Die Paketverwaltung ist eines der wichtigsten Werkzeuge, und sie wird von vielen Benutzern verwendet.",
    "en": "The package manager is one of the most important tools, and it is used by many of the users.",
    "es": "El gestor de paquetes es una de las herramientas más importantes y lo usan muchos de los usuarios.",
    "fr": "Le gestionnaire de paquets est l'un des outils les plus importants et il est utilisé par beaucoup.",
    "it": "Il gestore dei pacchetti è uno degli strumenti più importanti e viene usato da molti degli utenti.",
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_detect_language_on_prose(lang):
    assert detect_language(SENTENCES[lang]) == lang


def test_detect_language_refuses_thin_or_ambiguous_text():
    assert detect_language("apt-get install foo bar baz qux") is None  # no function words
    assert detect_language("la de") is None  # too few words
    assert detect_language("Siehe Section 2.6, « La vie »") is None
    scores = language_scores("the cat and the dog")
    assert scores["en"] == pytest.approx(3 / 5)  # "the", "and", "the"; each listed only for English


def test_paragraph_filter():
    keep = ParagraphFilter()
    assert keep(SENTENCES["de"])
    assert not keep("Zu kurz.")
    assert not keep("$ sudo apt-get install debian-reference-de and then read the documentation")
    assert not keep("Configure it like this:\nexport PATH=/usr/local/bin:$PATH  # and more words here")
    assert not keep("|\\ /| / /| \\_/_| / __--|\\_/ _\\ / /_ (o \\____o / /_ -----= / / /__ \\ ----")
    assert not keep("1234 5678 9012 3456 7890 1234 5678 9012 3456 7890 1234 5678 9012")


def test_normalize_and_dedup_key():
    assert normalize_paragraph("  a\x08a  b\t\tc \r\n\n  d\u00a0e ") == "a b c\nd e"
    assert normalize_paragraph("Cafe\u0301") == "Café"  # NFC
    assert dedup_key("Hello  World\n") == dedup_key("hello world")
    assert dedup_key("hello world") != dedup_key("hello, world")


def test_html_sections_keep_prose_drop_code_tables_navigation():
    html = """<html><head><title>T</title><style>p {}</style></head><body>
    <div class="navheader">Weiter Zurück</div>
    <div class="toc"><dl><dt>1. Kapitel</dt></dl></div>
    <h2>Erstes Kapitel</h2><p>Ein Satz mit <code>inline</code> Code und
       einem <a href="#">Link</a>.</p>
    <pre class="screen">$ apt-get update</pre>
    <table><tr><td>paket</td><td>beschreibung</td></tr></table>
    <ul><li>Punkt eins</li><li>Punkt zwei</li></ul>
    <h3>Zweites</h3><p>Noch&nbsp;ein &amp; Satz.<br>Zeile.</p></body></html>"""
    assert html_sections(html) == [
        ["Erstes Kapitel", "Ein Satz mit inline Code und einem Link.", "Punkt eins", "Punkt zwei"],
        ["Zweites", "Noch ein & Satz. Zeile."],  # &nbsp; collapses like any whitespace
    ]


def test_fortune_entries():
    text = "Erster Spruch.\n\t-- Jemand\n%\n%\nZweiter\nSpruch.\n%\n"
    assert fortune_entries(text) == ["Erster Spruch.\n\t-- Jemand", "Zweiter\nSpruch."]


def _fake_packages(root: Path) -> None:
    """A debian-reference-de and a fortunes-de tree as `dpkg-deb -x` would leave them."""
    ref = root / "debian-reference-de" / "usr/share/debian-reference"
    ref.mkdir(parents=True)
    untranslated = "This paragraph was not translated and is still in English, as it is in the original text."
    (ref / "ch01.de.html").write_text(
        f"<h2>Kapitel</h2><p>{SENTENCES['de']}</p><p>{untranslated}</p><pre>$ ls -l</pre>"
        f"<p>{SENTENCES['de']}</p><h2>Zweites Kapitel</h2>"
        "<p>Hier wird erklärt, wie man das System auf dem neuesten Stand hält und was dabei zu tun ist.</p>"
    )
    fortunes = root / "fortunes-de" / "usr/share/games/fortunes/de"
    (fortunes / "off").mkdir(parents=True)
    (fortunes / "sprueche").write_text(
        "Wer anderen eine Grube gräbt, der fällt selbst hinein, und das ist auch gut so.\n%\n"
        "Kurz.\n%\nAuch ein Spruch, der sich in der Liste der Sprüche findet und lang genug ist.\n"
    )
    (fortunes / "sprueche.dat").write_bytes(b"\x00\x01")
    (fortunes / "off" / "derb").write_text(
        "Das sollte nie gelesen werden, weil es im Verzeichnis off liegt.\n"
    )


def test_sample_corpus_pipeline_on_fake_packages(tmp_path, monkeypatch):
    _fake_packages(tmp_path / "extracted")
    monkeypatch.setattr(
        sample_corpus, "download_packages", lambda names, cache, **kw: {n: Path(n) for n in names}
    )
    monkeypatch.setattr(sample_corpus, "extract_package", lambda deb, dest: tmp_path / "extracted" / deb.name)
    packages = {"de": ["debian-reference-de", "fortunes-de"]}
    stats = sample_corpus.build_sample_corpus(tmp_path / "c4", ["de"], cache_dir=tmp_path, packages=packages)
    path = tmp_path / "c4" / "multilingual" / "c4-de.tfrecord-00000-of-00001.json.gz"
    with gzip.open(path, "rt") as f:
        records = [json.loads(line) for line in f]
    assert [set(r) for r in records] == [{"text", "timestamp", "url"}] * 4
    texts = [r["text"] for r in records]
    assert texts == [
        SENTENCES["de"],  # heading too short, English paragraph dropped, duplicate dropped
        "Hier wird erklärt, wie man das System auf dem neuesten Stand hält und was dabei zu tun ist.",
        "Wer anderen eine Grube gräbt, der fällt selbst hinein, und das ist auch gut so.",
        "Auch ein Spruch, der sich in der Liste der Sprüche findet und lang genug ist.",
    ]
    assert records[0]["url"] == "debian:debian-reference-de/usr/share/debian-reference/ch01.de.html#0"
    s = stats["de"]
    assert (s.documents, s.rejected_language, s.duplicates) == (4, 1, 1)
    assert s.bytes == sum(len(t.encode()) for t in texts)
    # read back through the C4 loader
    assert list(iter_texts(C4Source(path=str(tmp_path / "c4"), num_files=None), "de")) == texts
    # a second call reuses the corpus: nothing is downloaded or extracted
    monkeypatch.setattr(sample_corpus, "download_packages", None)
    again = sample_corpus.build_sample_corpus(tmp_path / "c4", ["de"], cache_dir=tmp_path, packages=packages)
    assert again["de"] == s


def test_sample_corpus_rejects_unknown_language_and_package(tmp_path):
    with pytest.raises(ValueError, match=r"languages: \['pt'\] not available .* accepted: \['de', 'en'"):
        sample_corpus.build_sample_corpus(tmp_path, ["pt"])
    with pytest.raises(ValueError, match="no known layout for package 'vim-doc'"):
        sample_corpus.build_sample_corpus(tmp_path, ["de"], packages={"de": ["vim-doc"]})
