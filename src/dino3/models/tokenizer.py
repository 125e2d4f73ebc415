"""CLIP's byte-level BPE tokenizer, as dino.txt uses it: text -> (N, 77) token ids.

The same tokens as Meta's dino.txt tokenizer (`dinov3/eval/text/tokenizer.py`, OpenAI CLIP's "simple
tokenizer") on every string. A text is cleaned as Meta's code cleans it (ftfy's `fix_text`, HTML
entities unescaped twice, runs of whitespace made one space, lower case), cut into pieces by CLIP's
pattern (letters, single digits, other symbols, English contractions), and each piece, as UTF-8
bytes spelled with 256 printable stand-in characters, is merged by the BPE ranks of the vocabulary
file. A row is [start-of-text, tokens..., end-of-text], zero-padded; a text too long for the context
keeps its first tokens and ends with end-of-text.

open_clip's tokenizer gives the same tokens, with two differences between the references: the
spelled-out markers "<|startoftext|>" / "<|endoftext|>" inside a text are special tokens to Meta's
(dino3 follows it), "<start_of_text>" / "<end_of_text>" to open_clip's; and open_clip splits
whitespace with Python's `str.split`, Meta's with the `regex` module's `\\s` (dino3 follows Meta).

Needs the `text` extra (ftfy and regex: pip install "dino3[text]"). The vocabulary is CLIP's
`bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI), shipped with dino3 (assets/SOURCES.md).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UsageError

DEFAULT_BPE_FILE = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file: 49408 tokens in all
WORD_END = "</w>"
# CLIP's pieces: the two markers, English contractions, runs of letters, single digits, runs of anything
# else that is not whitespace. Matched ignoring case, as in CLIP (it matters for characters such as the
# long s, which folds to s).
PIECES = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def byte_symbols() -> dict[int, str]:
    """The characters that stand for the bytes 0..255, in CLIP's vocabulary order: the printable bytes
    first, each standing for itself, then the others (controls, space, soft hyphen, ...) in byte order,
    standing for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class CLIPTokenizer:
    """CLIP's simple tokenizer. `tokenizer(texts)` -> LongTensor (N, context_length).

    bpe_file: the merges file (gzip or plain text); None is the copy shipped with dino3.
    It is safe to call from several threads (the only state is a bounded cache of merged words).
    """

    def __init__(self, bpe_file: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH) -> None:
        try:
            import ftfy
            import regex
        except ImportError:
            raise UsageError('the dino.txt tokenizer needs ftfy and regex: pip install "dino3[text]"') from None
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2 (start and end of text), got {context_length!r}")
        self.bpe_file = Path(bpe_file) if bpe_file is not None else DEFAULT_BPE_FILE
        self.context_length = context_length
        merges = read_merges(self.bpe_file)
        stand_ins = byte_symbols()
        symbols = list(stand_ins.values())
        vocabulary = symbols + [s + WORD_END for s in symbols] + ["".join(pair) for pair in merges]
        vocabulary += [START_OF_TEXT, END_OF_TEXT]
        self.token_ids = {token: i for i, token in enumerate(vocabulary)}
        self.tokens = vocabulary
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_symbol = [stand_ins[b] for b in range(256)]  # byte -> its character
        self.start_id, self.end_id = self.token_ids[START_OF_TEXT], self.token_ids[END_OF_TEXT]
        self.vocab_size = len(vocabulary)
        self._fix_text = ftfy.fix_text
        self._pieces = regex.compile(PIECES, regex.IGNORECASE)
        self._whitespace = regex.compile(r"\s+")
        self._merge = functools.lru_cache(maxsize=2**16)(self._merge_uncached)

    # -- the steps --------------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """Meta's cleaning: ftfy, HTML entities unescaped twice, whitespace runs -> one space, lower case."""
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return self._whitespace.sub(" ", text).strip().lower()

    def _merge_uncached(self, piece: str) -> tuple[str, ...]:
        """The BPE merges of one piece (in byte symbols): the word's symbols, the last one marked as the
        end of a word, merged pair by pair, the best-ranked adjacent pair first (all its occurrences,
        left to right), until no adjacent pair has a rank."""
        word = [*piece[:-1], piece[-1] + WORD_END]
        while len(word) > 1:
            ranked = [(self.ranks.get(pair, NUM_MERGES), pair) for pair in zip(word, word[1:])]
            rank, best = min(ranked)
            if rank == NUM_MERGES:  # no adjacent pair is a merge
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        """The token ids of one text, without start and end of text."""
        if not isinstance(text, str):
            raise TypeError(f"the tokenizer takes strings, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._pieces.findall(self.clean(text)):
            if piece in (START_OF_TEXT, END_OF_TEXT):
                ids.append(self.token_ids[piece])
                continue
            spelled = "".join(self.byte_symbol[b] for b in piece.encode("utf-8"))
            ids.extend(self.token_ids[token] for token in self._merge(spelled))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of token ids, as Meta's decodes it (word ends become spaces; padding zeros are "!")."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        symbol_byte = {s: b for b, s in enumerate(self.byte_symbol)}
        raw = bytes(symbol_byte[c] for c in "".join(self.tokens[i] for i in values))
        return raw.decode("utf-8", errors="replace").replace(WORD_END, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """(N, context_length) int64 token ids of one text or a list of them (see the module docstring)."""
        length = context_length or self.context_length
        items = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        out = torch.zeros(len(items), length, dtype=torch.long)
        for row, text in enumerate(items):
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > length:
                ids = ids[: length - 1] + [self.end_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    tokenize = __call__

    def __repr__(self) -> str:
        return f"CLIPTokenizer(bpe_file={str(self.bpe_file)!r}, context_length={self.context_length})"


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The BPE merges CLIP uses from a vocabulary file: the lines after the header, up to NUM_MERGES."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the BPE vocabulary {path}: {e.strerror or e}") from None
    try:
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a BPE vocabulary (gzip or UTF-8 text): {e}") from None
    lines = text.split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = next((i for i, pair in enumerate(merges) if len(pair) != 2), None)
    if len(merges) < NUM_MERGES or bad is not None:
        where = f"line {bad + 2} is not two symbols" if bad is not None else f"it has {len(merges)} merges"
        raise UsageError(
            f"{path} is not CLIP's BPE vocabulary ({where}; CLIP's bpe_simple_vocab_16e6.txt.gz has "
            f"{NUM_MERGES} after its header)"
        )
    return merges
