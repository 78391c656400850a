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


def _merges_for(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(pieces) > 1:
        merges.append((pieces[0], pieces[1]))
        pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: bytes, bytes + '</w>', merged word prefixes, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in COMMON_WORDS:
        for a, b in _merges_for(word):
            if (a, b) in seen:
                continue
            seen.add((a, b))
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


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
