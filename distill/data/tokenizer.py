"""Text <-> token ids for the transducer, with the blank symbol always at id 0.

Both tokenizers normalise text the same way (`normalize_text`): uppercase, keep letters (any script), digits
and apostrophes, turn every other character into a word break, collapse whitespace. That matches
LibriSpeech-style transcripts and makes WER scoring of decoded text comparable with the references.

Files are JSON (never pickles): `{"type": "char", ...}` or `{"type": "bpe", "model": <base64 sentencepiece
model>, ...}`, so one self-contained file describes the tokenizer; `load_tokenizer` picks the class.
"""
from __future__ import annotations

import base64
import io
import json
import unicodedata
from pathlib import Path
from typing import Iterable

__all__ = ["normalize_text", "CharTokenizer", "BPETokenizer", "load_tokenizer", "BLANK", "UNK"]

BLANK = "<blk>"
UNK = "<unk>"
SPACE = "\u2581"  # "▁", sentencepiece's word-boundary symbol; also the char tokenizer's space token


def normalize_text(text: str) -> str:
    """Uppercase; keep letters, digits and apostrophes; other characters become spaces; collapse spaces."""
    text = unicodedata.normalize("NFC", str(text)).upper().replace("\u2019", "'")
    kept = [c if (c.isalnum() or c == "'") else " " for c in text]
    return " ".join("".join(kept).split())


class CharTokenizer:
    """Characters of the training texts. ids: 0 = <blk>, 1 = <unk>, 2 = ▁ (space), then sorted characters."""

    kind = "char"
    blank_id = 0
    unk_id = 1

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        bad = [c for c in chars if len(c) != 1 or c in (" ", SPACE)]
        if bad:
            raise ValueError(f"CharTokenizer: invalid characters in vocabulary: {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: duplicate characters in vocabulary")
        self.symbols = [BLANK, UNK, SPACE] + chars
        self._id = {c: i for i, c in enumerate(self.symbols)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars = set()
        for t in texts:
            chars.update(normalize_text(t).replace(" ", ""))
        if not chars:
            raise ValueError("CharTokenizer.build: the training texts contain no usable characters")
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        norm = normalize_text(text)
        return [self._id[SPACE] if c == " " else self._id.get(c, self.unk_id) for c in norm]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.symbols):
                raise ValueError(f"CharTokenizer.decode: token id {i} out of range [0, {len(self.symbols)})")
            if i in (self.blank_id, self.unk_id):
                continue
            s = self.symbols[i]
            out.append(" " if s == SPACE else s)
        return " ".join("".join(out).split())

    def to_json(self) -> dict:
        return {"type": self.kind, "symbols": self.symbols}

    @classmethod
    def from_json(cls, d: dict) -> "CharTokenizer":
        if d.get("type") != cls.kind:
            raise ValueError(f"not a char tokenizer description (type={d.get('type')!r})")
        sym = d["symbols"]
        if sym[:3] != [BLANK, UNK, SPACE]:
            raise ValueError(f"char tokenizer symbols must start with {[BLANK, UNK, SPACE]}, got {sym[:3]}")
        return cls(sym[3:])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        return cls.from_json(_read_json(path))


class BPETokenizer:
    """sentencepiece BPE (or unigram) pieces; id 0 is <blk> (sentencepiece's pad slot), 1 is <unk>, no bos/eos.

    Giving the blank sentencepiece's pad id means sentencepiece never emits it when encoding, and the ids need
    no shifting: token id == sentencepiece id.
    """

    kind = "bpe"
    blank_id = 0
    unk_id = 1

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if self.sp.id_to_piece(0) != BLANK or self.sp.unk_id() != 1:
            raise ValueError(f"sentencepiece model must have {BLANK} at id 0 and <unk> at id 1 "
                             f"(got {self.sp.id_to_piece(0)!r}, unk id {self.sp.unk_id()}); train it with "
                             f"BPETokenizer.train")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_prefix: str | Path | None = None,
              model_type: str = "bpe") -> "BPETokenizer":
        """Train on normalised texts; also writes `<model_prefix>.model` when a prefix is given."""
        import sentencepiece as spm

        sentences = [s for s in (normalize_text(t) for t in texts) if s]
        if not sentences:
            raise ValueError("BPETokenizer.train: the training texts contain no usable characters")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=buf, vocab_size=int(vocab_size),
                model_type=model_type, character_coverage=1.0, pad_id=0, pad_piece=BLANK, unk_id=1,
                bos_id=-1, eos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
                input_sentence_size=2_000_000, shuffle_input_sentence=True)
        except RuntimeError as e:
            raise ValueError(f"BPETokenizer.train (vocab_size={vocab_size}, {len(sentences)} sentences): {e}") from e
        tok = cls(buf.getvalue())
        if model_prefix is not None:
            Path(f"{model_prefix}.model").write_bytes(tok.model_proto)
        return tok

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(normalize_text(text), out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"BPETokenizer.decode: token id {i} out of range [0, {self.vocab_size})")
        return " ".join(self.sp.decode([i for i in ids if i not in (self.blank_id, self.unk_id)]).split())

    def to_json(self) -> dict:
        return {"type": self.kind, "vocab_size": self.vocab_size,
                "model": base64.b64encode(self.model_proto).decode("ascii")}

    @classmethod
    def from_json(cls, d: dict) -> "BPETokenizer":
        if d.get("type") != cls.kind:
            raise ValueError(f"not a BPE tokenizer description (type={d.get('type')!r})")
        return cls(base64.b64decode(d["model"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        p = Path(path)
        if p.suffix == ".model":
            return cls(p.read_bytes())
        return cls.from_json(_read_json(p))


def _read_json(path: str | Path) -> dict:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"tokenizer file {path} is not a tokenizer description (no 'type' field)")
    return d


def tokenizer_from_json(d: dict):
    kinds = {CharTokenizer.kind: CharTokenizer, BPETokenizer.kind: BPETokenizer}
    if d.get("type") not in kinds:
        raise ValueError(f"unknown tokenizer type {d.get('type')!r}; expected one of {sorted(kinds)}")
    return kinds[d["type"]].from_json(d)


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved by either class (JSON), or a raw sentencepiece `.model` file."""
    p = Path(path)
    if p.suffix == ".model":
        return BPETokenizer.load(p)
    d = _read_json(p)
    try:
        return tokenizer_from_json(d)
    except ValueError as e:
        raise ValueError(f"tokenizer file {path}: {e}") from e
