"""The offline sample corpus: real natural text in de, en, es, fr and it from Debian packages.

Why: nothing may be downloaded from the Hugging Face Hub here, but Debian's archive is reachable.
Its translated documentation (Debian Reference, the Debian Administrator's Handbook, the FAQ, the
New Maintainers' Guide, the Developer's Reference) and its quotation files (`fortunes*`) are real
prose in all five languages. The packages are fetched with `apt-get download` into a cache, unpacked
with `dpkg-deb -x`, turned into paragraphs (stdlib html.parser; '%'-separated fortunes), cleaned
(`data_prep.clean`), language-checked (`data_prep.langcheck`), deduplicated, and written out in C4
layout so the build reads them through the very same loader as C4.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from data_prep.clean import ParagraphFilter, dedup_key, normalize_paragraph
from data_prep.langcheck import LANGUAGES, detect_language
from data_prep.textextract import fortune_entries, html_sections
from heloco import checkpoint

CACHE_ENV = "HELOCO_CACHE_DIR"  # where the sample's downloads and corpus go; default ~/.cache/heloco


def default_cache_dir() -> str:
    """``$HELOCO_CACHE_DIR/debian`` (default ``~/.cache/heloco/debian``): the downloaded .deb packages
    and their extracted files (~180 MB); the cleaned corpus goes next to it, in ``sample_c4``.
    Read when a build starts, so setting the variable moves both."""
    return str(Path(os.environ.get(CACHE_ENV) or "~/.cache/heloco") / "debian")


SAMPLE_LANGUAGES = LANGUAGES
# Which packages feed which language. French is the thinnest translation, hence the extra manuals.
DEFAULT_PACKAGES: dict[str, tuple[str, ...]] = {
    "de": ("debian-reference-de", "debian-handbook", "fortunes-de"),
    "en": ("debian-reference-en", "debian-handbook", "fortunes"),
    "es": ("debian-reference-es", "debian-handbook", "fortunes-es"),
    "fr": (
        "debian-reference-fr",
        "debian-handbook",
        "debian-faq-fr",
        "maint-guide-fr",
        "developers-reference-fr",
    ),
    "it": ("debian-reference-it", "debian-handbook", "fortunes-it"),
}
_LOCALES = {"de": "de-DE", "en": "en-US", "es": "es-ES", "fr": "fr-FR", "it": "it-IT"}
# package name template -> (kind, glob of its files for one language, relative to the unpacked root).
# Fortune globs are not recursive: offensive sections live in an `off/` sub-directory and stay out.
PACKAGE_LAYOUTS: dict[str, tuple[str, str]] = {
    "debian-reference-{lang}": ("html", "usr/share/debian-reference/*.{lang}.html"),
    "debian-handbook": ("html", "usr/share/doc/debian-handbook/html/{locale}/*.html"),
    "debian-faq-{lang}": ("html", "usr/share/doc/debian/FAQ/{lang}/*.html"),
    "maint-guide-{lang}": ("html", "usr/share/doc/maint-guide-{lang}/html/*.html"),
    "developers-reference-{lang}": ("html", "usr/share/developers-reference/{lang}/*.html"),
    "fortunes-{lang}": ("fortune", "usr/share/games/fortunes/{lang}/*"),
    "fortunes": ("fortune", "usr/share/games/fortunes/*"),
}
CORPUS_VERSION = 1  # bump when extraction or cleaning changes, so cached corpora are rebuilt


@dataclass
class LanguageStats:
    documents: int = 0
    paragraphs: int = 0
    bytes: int = 0
    rejected_filter: int = 0
    rejected_language: int = 0
    duplicates: int = 0

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


def package_layout(package: str, lang: str) -> tuple[str, str]:
    """(kind, file glob) of `package` for `lang`; ValueError listing the known packages otherwise."""
    for template, (kind, pattern) in PACKAGE_LAYOUTS.items():
        if template.format(lang=lang) == package:
            return kind, pattern.format(lang=lang, locale=_LOCALES.get(lang, lang))
    known = sorted(t.format(lang=lang) for t in PACKAGE_LAYOUTS)
    raise ValueError(
        f"sample_packages: no known layout for package {package!r} in language {lang!r}; known: {known}"
    )


def corpus_files(corpus_dir: str | Path, languages: Sequence[str]) -> dict[str, Path]:
    """Where the sample corpus of each language lives, in C4 layout."""
    root = Path(corpus_dir).expanduser()
    return {lang: root / "multilingual" / f"c4-{lang}.tfrecord-00000-of-00001.json.gz" for lang in languages}


def build_sample_corpus(
    corpus_dir: str | Path,
    languages: Sequence[str] = SAMPLE_LANGUAGES,
    *,
    cache_dir: str | Path | None = None,
    packages: Mapping[str, Sequence[str]] | None = None,
    paragraph_filter: ParagraphFilter | None = None,
    max_document_chars: int = 4000,
    apt_update: bool = True,
    force: bool = False,
) -> dict[str, LanguageStats]:
    """Download, extract, clean and write the sample corpus; reuse it when already built alike.

    Returns per-language statistics (also kept in `<corpus_dir>/manifest.json`). ``cache_dir``:
    where the packages are downloaded and extracted (default: ``default_cache_dir()``).
    """
    unknown = [lang for lang in languages if lang not in SAMPLE_LANGUAGES]
    if unknown:
        raise ValueError(
            f"languages: {unknown} not available in the sample corpus; accepted: {list(SAMPLE_LANGUAGES)}"
        )
    packages = {lang: tuple((packages or DEFAULT_PACKAGES)[lang]) for lang in languages}
    for lang, names in packages.items():
        if not names:
            raise ValueError(f"sample_packages: no packages given for language {lang!r}")
        for name in names:
            package_layout(name, lang)
    paragraph_filter = paragraph_filter or ParagraphFilter()
    corpus_dir = Path(corpus_dir).expanduser()
    params = {
        "version": CORPUS_VERSION,
        "packages": {lang: list(names) for lang, names in packages.items()},
        "filter": asdict(paragraph_filter),
        "max_document_chars": max_document_chars,
    }
    cache_dir = Path(cache_dir or default_cache_dir()).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Runs started together (compare.py lanes) share the cache: one builds, the others wait, then reuse.
    with FileLock(cache_dir / ".build.lock"):
        built = None if force else _built_corpus(corpus_dir, languages, params)
        if built is not None:
            return built
        needed = sorted({name for names in packages.values() for name in names})
        debs = download_packages(needed, cache_dir, apt_update=apt_update)
        roots = {name: extract_package(debs[name], cache_dir / "extracted") for name in needed}
        seen: set[bytes] = set()  # dedup keys across languages
        stats = {lang: LanguageStats() for lang in languages}
        files = corpus_files(corpus_dir, languages)
        for lang in languages:
            sources = [
                (name, roots[name], *_package_files(name, roots[name], lang)) for name in packages[lang]
            ]
            _write_language(
                files[lang], sources, lang, paragraph_filter, seen, stats[lang], max_document_chars
            )
        manifest = {"params": params, "stats": {lang: asdict(s) for lang, s in stats.items()}}
        checkpoint.atomic_write_text(corpus_dir / "manifest.json", json.dumps(manifest, indent=2))
        return stats


def _built_corpus(
    corpus_dir: Path, languages: Sequence[str], params: Mapping[str, object]
) -> dict[str, LanguageStats] | None:
    """The statistics of a corpus already built with the same ``params``, or None."""
    manifest_path = corpus_dir / "manifest.json"
    if not manifest_path.is_file() or not all(
        f.is_file() for f in corpus_files(corpus_dir, languages).values()
    ):
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("params") != params:
        return None
    return {lang: LanguageStats(**manifest["stats"][lang]) for lang in languages}


def _write_language(
    path: Path,
    sources: Sequence[tuple[str, Path, str, Sequence[Path]]],
    lang: str,
    paragraph_filter: ParagraphFilter,
    seen: set[bytes],
    stats: LanguageStats,
    max_document_chars: int,
) -> None:
    """One language's documents, from (package, unpacked root, kind, files) sources, into ``path``
    (C4 layout, gzipped JSON lines), written to a temporary file and moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(paths) for *_, paths in sources), desc=f"sample corpus {lang}", unit="file")
    tmp = path.with_suffix(".tmp")
    # mtime=0 keeps the gzip bytes identical across rebuilds.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for name, root, kind, paths in sources:
            for file in paths:
                for doc in _file_documents(
                    name, root, file, kind, lang, paragraph_filter, seen, stats, max_document_chars
                ):
                    gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
                    stats.documents += 1
                    stats.bytes += len(doc["text"].encode())
                bar.update()
    bar.close()
    os.replace(tmp, path)


def format_stats(stats: Mapping[str, LanguageStats]) -> str:
    """A small table: MB of text and documents per language."""
    lines = [
        f"{'lang':<5} {'MB':>7} {'documents':>10} {'paragraphs':>11} {'not prose':>10} {'other lang':>10} {'dups':>6}"
    ]
    for lang, s in stats.items():
        lines.append(
            f"{lang:<5} {s.megabytes:>7.2f} {s.documents:>10} {s.paragraphs:>11} {s.rejected_filter:>10} "
            f"{s.rejected_language:>10} {s.duplicates:>6}"
        )
    return "\n".join(lines)


def download_packages(
    packages: Sequence[str], cache_dir: Path, *, apt_update: bool = True
) -> dict[str, Path]:
    """`apt-get download` the packages not yet in `cache_dir`; returns package -> .deb path.

    When apt does not know a package (no package lists yet, as in a fresh container), runs
    `apt-get update` once and retries, if `apt_update` allows it.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            "source 'sample' needs Debian's apt-get and dpkg-deb; on other systems use source 'c4' or 'local'"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in packages if _cached_deb(cache_dir, name) is None]
    if missing:
        result = _apt_download(missing, cache_dir)
        if result.returncode != 0 and apt_update:
            tqdm.write("apt-get download failed; running `apt-get update` once and retrying")
            subprocess.run(["apt-get", "update"], check=False, capture_output=True, text=True)
            result = _apt_download(missing, cache_dir)
        if result.returncode != 0:
            raise RuntimeError(
                f"apt-get download {' '.join(missing)} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}\nTry `apt-get update` first, or set sample_packages."
            )
    debs = {name: _cached_deb(cache_dir, name) for name in packages}
    absent = [name for name, deb in debs.items() if deb is None]
    if absent:
        raise RuntimeError(f"apt-get download did not produce .deb files for {absent} in {cache_dir}")
    return debs  # type: ignore[return-value]


def extract_package(deb: Path, dest_root: Path) -> Path:
    """`dpkg-deb -x` into `<dest_root>/<deb name>/` (once; a marker file records completion)."""
    dest = dest_root / deb.stem
    marker = dest / ".extracted"
    if not marker.is_file():
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
        marker.touch()
    return dest


def _apt_download(packages: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["apt-get", "download", *packages], cwd=cwd, capture_output=True, text=True, check=False
    )


def _cached_deb(cache_dir: Path, package: str) -> Path | None:
    debs = sorted(cache_dir.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def _package_files(package: str, root: Path, lang: str) -> tuple[str, list[Path]]:
    """(kind, sorted text files) of an unpacked package for one language; symlinks and indexes skipped."""
    kind, pattern = package_layout(package, lang)
    paths = sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not paths:
        raise FileNotFoundError(f"package {package} has no files matching {pattern!r} under {root}")
    return kind, paths


def _file_documents(
    package: str,
    root: Path,
    path: Path,
    kind: str,
    lang: str,
    keep: ParagraphFilter,
    seen: set[bytes],
    stats: LanguageStats,
    max_document_chars: int,
) -> Iterator[dict[str, str]]:
    """C4-style records (text, timestamp, url) of one file: an HTML section or a fortune per group."""
    rel = path.relative_to(root).as_posix()
    timestamp = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = path.read_bytes().decode("utf-8", errors="replace")
    groups = html_sections(text) if kind == "html" else [[entry] for entry in fortune_entries(text)]
    for index, group in enumerate(groups):
        paragraphs = _clean(group, lang, keep, seen, stats)
        for part, doc in enumerate(_chunk(paragraphs, max_document_chars)):
            url = f"debian:{package}/{rel}#{index}" + (f".{part}" if part else "")
            yield {"text": doc, "timestamp": timestamp, "url": url}


def _clean(
    paragraphs: list[str], lang: str, keep: ParagraphFilter, seen: set[bytes], stats: LanguageStats
) -> list[str]:
    """Filter, language-check, then deduplicate (after the check, so an English paragraph met first in a
    German file is not lost to the English corpus)."""
    kept = []
    for raw in paragraphs:
        paragraph = normalize_paragraph(raw)
        if not keep(paragraph):
            stats.rejected_filter += 1
        elif detect_language(paragraph) != lang:
            stats.rejected_language += 1
        else:
            key = dedup_key(paragraph)
            if key in seen:
                stats.duplicates += 1
            else:
                seen.add(key)
                kept.append(paragraph)
                stats.paragraphs += 1
    return kept


def _chunk(paragraphs: list[str], max_chars: int) -> Iterator[str]:
    """Join consecutive paragraphs into documents of at most ~max_chars (a paragraph is never split)."""
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        if current and size + len(paragraph) > max_chars:
            yield "\n".join(current)
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 1
    if current:
        yield "\n".join(current)


def corpus_digest(corpus_dir: str | Path, languages: Sequence[str]) -> str:
    """Content hash of the written corpus files, recorded in the shards' metadata."""
    h = hashlib.sha256()
    for lang, path in corpus_files(corpus_dir, languages).items():
        h.update(lang.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m data_prep.sample_corpus [--corpus_dir DIR] [--cache_dir DIR] [--force]`: build and report."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data_prep.sample_corpus", description=main.__doc__)
    parser.add_argument(
        "--corpus_dir", default=str(Path(default_cache_dir()).expanduser().parent / "sample_c4")
    )
    parser.add_argument("--cache_dir", default=default_cache_dir())
    parser.add_argument("--languages", default=",".join(SAMPLE_LANGUAGES))
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching corpus exists")
    args = parser.parse_args(argv)
    stats = build_sample_corpus(
        args.corpus_dir, args.languages.split(","), cache_dir=args.cache_dir, force=args.force
    )
    print(format_stats(stats))
    print(f"written in C4 layout under {Path(args.corpus_dir).expanduser()}/multilingual/")


if __name__ == "__main__":
    main()
