"""Transcripts for the synthetic corpus: real English sentences, normalised to ASR-style text, shipped offline.

The bundled `sentences.txt.gz` (next to this module) holds ~22k distinct sentences from Jane Austen's six novels
(1811-1818, public domain). It was built by `python -m distill.synth.text --from-janeaustenr DIR` from the Debian
package `r-cran-janeaustenr` (its R lazy-load data holds the Project Gutenberg texts line by line); the builder is
kept here so the file can be checked and rebuilt, but nothing at run time needs R or that package.

Normalised text = uppercase A-Z, apostrophes and single spaces; common abbreviations spelled out the way a
speech synthesiser reads them (MR -> MISTER); sentences with digits, initials or other symbols are dropped
rather than guessed at, so the transcript is exactly what is spoken.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import unicodedata
from functools import lru_cache
from typing import Iterable, Iterator

__all__ = ["SENTENCES_PATH", "load_sentences", "normalise", "split_sentences", "extract_sentences"]

SENTENCES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentences.txt.gz")

MIN_WORDS, MAX_WORDS = 4, 20

# Abbreviations are protected from sentence splitting (period removed) and spelled out after uppercasing.
_ABBREVIATIONS = {"MR": "MISTER", "MRS": "MISSUS", "DR": "DOCTOR", "ST": "SAINT", "ESQ": "ESQUIRE",
                  "COL": "COLONEL", "CAPT": "CAPTAIN"}
_ABBR_DOT = re.compile(r"\b(Mr|Mrs|Dr|St|Esq|Col|Capt)\.")
# Split after . ! ? ; : plus any closing quotes/brackets/italics marks. Pieces that do not start with a capital
# (dialogue tags such as `said he`, mid-sentence clauses) are dropped by `normalise`.
_SPLIT = re.compile(r"(?<=[.!?;:])[\"'_)\]]*\s+")
_PUNCT = re.compile(r"--+|[-_\"()\[\],.;:!?*]")
_QUOTE_MARKS = re.compile(r"(^|\s)'+|'+(\s|$)")  # quote marks, not apostrophes inside words
_BAD = re.compile(r"[^A-Za-z' ]")
_SINGLE_LETTER_WORDS = {"A", "I", "O"}


def normalise(sentence: str, *, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """One sentence -> normalised transcript, or None when it is not a clean spoken sentence of 4-20 words."""
    s = unicodedata.normalize("NFKD", sentence).encode("ascii", "ignore").decode()
    s = _ABBR_DOT.sub(r"\1", s).strip(" \t\"'_([-")
    if not s or not s[0].isupper() or any(c.isdigit() for c in s):
        return None
    s = s.replace("&", " and ")
    s = _QUOTE_MARKS.sub(" ", _PUNCT.sub(" ", s))
    if _BAD.search(s) or s.upper() == s:  # other symbols; all-caps headings
        return None
    words = [_ABBREVIATIONS.get(w, w) for w in s.upper().split()]
    if any(len(w) == 1 and w not in _SINGLE_LETTER_WORDS for w in words):  # initials: reading is ambiguous
        return None
    if not min_words <= len(words) <= max_words:
        return None
    return " ".join(words)


def split_sentences(paragraph: str) -> list[str]:
    """Split running prose into sentence-like pieces (abbreviation periods do not end a sentence)."""
    return [p for p in _SPLIT.split(_ABBR_DOT.sub(r"\1", paragraph)) if p.strip()]


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    cur: list[str] = []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            yield " ".join(cur)
            cur = []
    if cur:
        yield " ".join(cur)


def extract_sentences(lines: Iterable[str]) -> list[str]:
    """Wrapped text lines (blank line = paragraph break) -> distinct normalised sentences, in text order."""
    out: dict[str, None] = {}
    for para in _paragraphs(lines):
        for piece in split_sentences(para):
            s = normalise(piece)
            if s is not None:
                out.setdefault(s)
    return list(out)


_NORMALISED = re.compile(r"[A-Z']+( [A-Z']+)*")


def _read_sentences(path: str) -> tuple[str, ...]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"sentence file {path} is missing or unreadable ({e})") from None
    sents: dict[str, None] = {}  # deduplicated: a repeated line could otherwise land in two splits
    for lineno, ln in enumerate(lines, 1):
        if not ln or ln.startswith("#"):
            continue
        if not _NORMALISED.fullmatch(ln):
            raise ValueError(f"{path}:{lineno}: not normalised text (A-Z, apostrophes, single spaces): {ln[:80]!r}")
        sents.setdefault(ln)
    if not sents:
        raise ValueError(f"sentence file {path} has no sentences")
    return tuple(sents)


@lru_cache(maxsize=1)
def _bundled() -> tuple[str, ...]:
    return _read_sentences(SENTENCES_PATH)


def load_sentences(path: str | None = None) -> list[str]:
    """Distinct normalised sentences, one per line ('#' lines are comments; .gz or plain text); the bundled
    Austen set by default. A line that is not normalised text raises ValueError naming file and line."""
    if path is None or os.path.abspath(path) == SENTENCES_PATH:
        return list(_bundled())
    return list(_read_sentences(os.path.abspath(path)))


# ------------------------------------------------------------------------------------------------------------
# Rebuilding the bundled file from r-cran-janeaustenr (R lazy-load database of character vectors).


class _RReader:
    """Just enough of R's XDR serialization (format 2/3) to read character vectors and lists of them."""

    def __init__(self, buf: bytes):
        self.b, self.i, self.refs = buf, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def read(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.i = 2
        version = self._int()
        self._int(), self._int()
        if version == 3:  # native encoding name follows
            n = self._int()
            self.i += n
        return self._item()

    def _item(self):
        flags = self._int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 242, 241, 251, 247, 246):  # NULL, environments, missing arg, base namespace
            return None
        if t == 255:  # reference
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if t == 1:  # symbol
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if t in (249, 250):  # namespace / package: persistent string vector
            self._int()
            v = [self._item() for _ in range(self._int())]
            self.refs.append(v)
            return v
        if t in (2, 3, 5, 6, 17):  # pairlists
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car, cdr = self._item(), self._item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        if t in (10, 13):
            n = self._int()
            out = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:
            n = self._int()
            out = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (16, 19, 20):
            out = [self._item() for _ in range(self._int())]
        else:
            raise ValueError(f"unsupported R object type {t}")
        if has_attr:
            self._item()
        return out


def _read_lazyload(data_dir: str) -> list[list[str]]:
    """Every character vector stored in an R package's data/Rdata.rdb (index in Rdata.rdx)."""
    import bz2
    import lzma
    import zlib

    with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        index = _RReader(gzip.decompress(f.read())).read()
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        db = f.read()
    out = []
    for off, length in index[0]:  # index = list(variables = list(c(offset, length), ...), ...)
        blob = db[int(off):int(off) + int(length)]
        kind = blob[4:5]
        raw = (lzma.decompress(blob[5:]) if kind == b"Z" else bz2.decompress(blob[5:]) if kind == b"2"
               else blob[5:] if kind == b"0" else zlib.decompress(blob[4:]))
        obj = _RReader(raw).read()
        if isinstance(obj, list) and obj and all(isinstance(x, str) or x is None for x in obj):
            out.append([x or "" for x in obj])
    return out


def build_from_janeaustenr(src: str, out_path: str = SENTENCES_PATH) -> int:
    """Write the sentence file from an r-cran-janeaustenr .deb or its extracted tree; returns the count."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = src
        if src.endswith(".deb"):
            subprocess.run(["dpkg-deb", "-x", src, tmp], check=True)
            root = tmp
        data_dir = next((d for d, _, files in os.walk(root) if "Rdata.rdb" in files), None)
        if data_dir is None:
            raise FileNotFoundError(f"no data/Rdata.rdb under {src}")
        books = _read_lazyload(data_dir)
    seen: dict[str, None] = {}
    for lines in books:
        for s in extract_sentences(lines):
            seen.setdefault(s)
    header = ("# Sentences from Jane Austen's six novels (public domain), normalised for ASR; "
              "built by distill.synth.text from Debian r-cran-janeaustenr.\n")
    with open(out_path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write((header + "".join(s + "\n" for s in seen)).encode("utf-8"))
    return len(seen)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-janeaustenr", required=True, metavar="DEB_OR_DIR",
                    help="r-cran-janeaustenr .deb (apt-get download r-cran-janeaustenr) or an extracted tree")
    ap.add_argument("--out", default=SENTENCES_PATH)
    a = ap.parse_args()
    print(f"wrote {build_from_janeaustenr(a.from_janeaustenr, a.out)} sentences to {a.out}")
