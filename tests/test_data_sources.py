"""The one loader: C4 in the Hub's layout (on local files), local json/parquet/text sources, errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.sources import C4Source, LocalSource, iter_texts
from data_prep.synthetic import write_c4_layout


def test_c4_patterns_for_the_hub():
    hub = C4Source()
    assert hub.path == "allenai/c4" and not hub.is_local
    assert hub.patterns("de") == ["multilingual/c4-de.tfrecord-00000-of-*.json.gz"]
    assert hub.patterns("en") == ["en/c4-train.00000-of-*.json.gz"]
    assert C4Source(english="multilingual").patterns("en") == [
        "multilingual/c4-en.tfrecord-00000-of-*.json.gz"
    ]
    assert C4Source(num_files=3).patterns("fr") == [
        f"multilingual/c4-fr.tfrecord-0000{i}-of-*.json.gz" for i in range(3)
    ]
    assert C4Source(data_files={"it": "x/*.json.gz"}).patterns("it") == ["x/*.json.gz"]


def test_c4_loader_reads_local_files_in_hub_layout(tmp_path):
    docs = {"de": [f"Dokument {i}" for i in range(6)], "fr": [f"Document {i}" for i in range(4)]}
    docs["en"] = [f"Document {i} in English" for i in range(5)]
    write_c4_layout(tmp_path, {k: v for k, v in docs.items() if k != "en"}, num_files=2)
    write_c4_layout(tmp_path, {"en": docs["en"]}, num_files=2, english="en")
    # round-robin split: file 0 holds documents 0, 2, 4; file 1 holds 1, 3, 5
    assert list(iter_texts(C4Source(path=str(tmp_path), num_files=1), "de")) == docs["de"][0::2]
    assert (
        list(iter_texts(C4Source(path=str(tmp_path), num_files=2), "de"))
        == docs["de"][0::2] + docs["de"][1::2]
    )
    assert sorted(iter_texts(C4Source(path=str(tmp_path), num_files=None), "fr")) == sorted(docs["fr"])
    assert list(iter_texts(C4Source(path=str(tmp_path), num_files=1, english="en"), "en")) == docs["en"][0::2]


def test_c4_loader_errors_name_the_missing_pattern(tmp_path):
    write_c4_layout(tmp_path, {"de": ["x"]})
    with pytest.raises(
        FileNotFoundError, match=r"language 'fr' match 'multilingual/c4-fr\.tfrecord-00000-of-\*"
    ):
        list(iter_texts(C4Source(path=str(tmp_path)), "fr"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_texts(C4Source(path=str(tmp_path / "nope")), "de"))
    (tmp_path / "multilingual" / "c4-it.tfrecord-00000-of-00001.json.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        list(iter_texts(C4Source(path=str(tmp_path)), "it"))
    with pytest.raises(ValueError, match="c4_english must be one of"):
        C4Source(english="british")
    with pytest.raises(ValueError, match="c4_num_files must be >= 1"):
        C4Source(num_files=0)


def test_local_json_with_language_column(tmp_path):
    rows = [{"body": f"text {i}", "lang": "de" if i % 3 else "fr"} for i in range(9)] + [
        {"body": " ", "lang": "de"}
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = LocalSource(path=str(path), text_column="body", language_column="lang")
    assert list(iter_texts(source, "fr")) == ["text 0", "text 3", "text 6"]
    assert len(list(iter_texts(source, "de"))) == 6  # the blank document is skipped
    with pytest.raises(ValueError, match=r"column 'text' not found .* columns are \['body', 'lang'\]"):
        list(iter_texts(LocalSource(path=str(path), language_column="lang"), "de"))


def test_local_parquet_glob_with_language_column(tmp_path):
    for part in range(2):
        table = pa.table({"text": [f"p{part} d{i}" for i in range(3)], "language": ["it", "es", "it"]})
        pq.write_table(table, tmp_path / f"part-{part}.parquet")
    source = LocalSource(path=str(tmp_path / "*.parquet"), language_column="language")
    assert list(iter_texts(source, "it")) == ["p0 d0", "p0 d2", "p1 d0", "p1 d2"]


def test_local_directory_per_language_text_and_json_gz(tmp_path):
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "a.txt").write_text("Erster Absatz.\nNoch eine Zeile.\n\nZweiter Absatz.\n")
    (tmp_path / "es").mkdir()
    with gzip.open(tmp_path / "es" / "x.json.gz", "wt") as f:
        f.write(json.dumps({"text": "Hola mundo"}) + "\n" + json.dumps({"text": "Adiós"}) + "\n")
    source = LocalSource(path=str(tmp_path))
    assert list(iter_texts(source, "de")) == ["Erster Absatz.\nNoch eine Zeile.", "Zweiter Absatz."]
    assert list(iter_texts(LocalSource(path=str(tmp_path), sample_by="line"), "de")) == [
        "Erster Absatz.",
        "Noch eine Zeile.",
        "Zweiter Absatz.",
    ]
    assert list(iter_texts(source, "es")) == ["Hola mundo", "Adiós"]
    with pytest.raises(FileNotFoundError, match=r"no directory for language 'fr' .* found \['de', 'es'\]"):
        list(iter_texts(source, "fr"))


def test_local_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        LocalSource(path=str(tmp_path / "missing")).files("de")
    (tmp_path / "de").mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        LocalSource(path=str(tmp_path)).files("de")
    (tmp_path / "de" / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty"):
        LocalSource(path=str(tmp_path)).files("de")
    (tmp_path / "de" / "empty.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "de" / "b.txt").write_text("b\n")
    with pytest.raises(ValueError, match=r"mix formats \['json', 'text'\]"):
        source = LocalSource(path=str(tmp_path))
        source.builder(source.files("de"))
    with pytest.raises(ValueError, match="local_format must be one of"):
        LocalSource(path=".", format="csv")
    with pytest.raises(ValueError, match="local_sample_by must be one of"):
        LocalSource(path=".", sample_by="sentence")
