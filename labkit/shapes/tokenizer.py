"""A CLIP-format BPE tokenizer fitted to the shapes prompt vocabulary.

The files are exactly those of SD's tokenizer (``vocab.json``, ``merges.txt``): the 256 byte symbols, the
same with the end-of-word marker ``</w>``, merges that build every prompt word into a single token, and the
two special tokens ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token, as in SD 1.x). Any
other English text still tokenizes (into characters), so a prompt outside the data does not crash.

Load the result with ``CLIPTokenizer.from_pretrained(folder)``: with transformers 5,
``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from .data import all_prompts

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77  # as SD: the pipeline pads every prompt to this many tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def prompt_words(prompts: list[str] | None = None) -> list[str]:
    """The distinct words of the prompts (by default every shapes prompt), longest first."""
    prompts = all_prompts() if prompts is None else prompts
    words = {w for p in prompts for w in p.lower().split()}
    return sorted(words, key=lambda w: (-len(w), w))


def _chain(symbols: list[str]) -> list[tuple[str, str]]:
    """Merges that join ``symbols`` left to right into one token."""
    merges = []
    left = symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def _write(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Load a tokenizer folder (vocab.json + merges.txt) the way that works on transformers 4 and 5."""
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    tokenizer.model_max_length = MAX_LENGTH
    return tokenizer


def fit_tokenizer(folder: str | Path, prompts: list[str] | None = None) -> CLIPTokenizer:
    """Write a CLIP-format tokenizer for the prompt vocabulary into ``folder`` and load it.

    Every word of ``prompts`` (default: all shapes prompts) becomes one token.
    """
    folder = Path(folder)
    base = list(bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base]
    words = prompt_words(prompts)
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merges += [m for m in _chain(symbols) if m not in merges]

    # BPE applies merges by rank over the whole word, so one word's merge can split another word;
    # check with the real tokenizer and add merges for what is still split, until every word is one token
    for _ in range(10):
        vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens + [a + b for a, b in merges]))}
        vocab[BOS] = len(vocab)
        vocab[EOS] = len(vocab)
        _write(folder, vocab, merges)
        tokenizer = load_tokenizer(folder)
        split = {w: tokenizer.tokenize(w) for w in words}
        split = {w: toks for w, toks in split.items() if len(toks) != 1}
        if not split:
            return tokenizer
        for toks in split.values():
            merges += [m for m in _chain(toks) if m not in merges]
    raise RuntimeError(f"could not fit a one-token-per-word tokenizer; still split: {split}")
