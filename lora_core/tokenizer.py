"""The project's own CLIP tokenizer: a byte-level BPE vocabulary generated here, so nothing is downloaded.

Every byte maps to a character (GPT-2's byte-to-unicode table), each character exists with and without
the end-of-word marker, and a short list of merges joins the words the demo world and common captions
use. Any text tokenizes; unknown words simply fall apart into characters.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that get whole-word tokens: shapes, colours, positions and common caption words.
COMMON_WORDS = (
    "a an the of on in and with photo picture drawing style small medium large big tiny "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle star cross diamond ring heart hexagon stripes dots checker "
    "background top bottom left right center centre corner person man woman dog cat "
    "portrait landscape painting illustration anime realistic detailed sks ohwx"
).split()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Pieces of `word` after byte-pair merging with `ranks` (lowest rank first), as CLIP's BPE does."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: bytes, bytes + '</w>', then merges that make every common word one token.

    Each word is tokenized with the merges so far and new merges join what is left, left to right. New
    merges rank after all earlier ones, so words added before stay whole.
    """
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in symbols + [sym + "</w>" for sym in symbols]:
        vocab.setdefault(sym, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in COMMON_WORDS:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks.setdefault(pair, len(ranks))
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, sorted(ranks, key=ranks.get)


def make_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over the generated vocabulary (deterministic; same ids every time)."""
    vocab, merges = build_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def vocab_size() -> int:
    return len(build_vocab()[0])


def save_tokenizer(directory: str | Path) -> Path:
    """Write the tokenizer files (vocab.json, merges.txt, configs) into `directory`."""
    path = Path(directory)
    make_tokenizer().save_pretrained(path)
    return path
