"""Each token's own bytes, as its tokenizer's vocabulary spells them, for logprobs' `bytes` and
`text_offset`.

Decoding a token alone cannot give them: a token holding part of a multi-byte UTF-8 character
(three tokens spell 😀 in SmolLM2's vocabulary) decodes to U+FFFD, whose bytes are not the
token's. The vocabulary holds the raw bytes: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen)
spells each byte as one printable character; SentencePiece with byte fallback (Llama 2, Mistral)
spells a byte as `<0xNN>` and a space as `▁`. A tokenizer spelled any other way gets each token
decoded alone (right for every token that holds whole characters).
"""

import json
import re

from transformers.convert_slow_tokenizer import bytes_to_unicode

SENTENCEPIECE_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """Token id -> the bytes it adds to the text, built once per model (a pass over the vocabulary)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder  # special and user-added tokens: spelled as they read
        self.special_ids = frozenset(token_id for token_id, token in added.items() if token.special)
        self.by_id = _vocabulary_bytes(tokenizer) | {
            token_id: token.content.encode() for token_id, token in added.items()
        }

    def __call__(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """A special token adds nothing to a text decoded with `skip_special_tokens` (the default)."""
        if skip_special_tokens and token_id in self.special_ids:
            return b""
        spelled = self.by_id.get(token_id)
        if spelled is None:
            return self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens).encode()
        return spelled


def _vocabulary_bytes(tokenizer) -> dict[int, bytes]:
    """{token id: bytes} for the vocabularies this module can read; {} for any other."""
    decoders = _decoder_types(tokenizer)
    vocabulary = tokenizer.get_vocab()
    if "ByteLevel" in decoders:
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        return {
            token_id: bytes(byte_of[char] for char in piece)
            for piece, token_id in vocabulary.items()
            if all(char in byte_of for char in piece)
        }
    if "ByteFallback" in decoders:
        return {token_id: _sentencepiece_bytes(piece) for piece, token_id in vocabulary.items()}
    return {}


def _sentencepiece_bytes(piece: str) -> bytes:
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte is not None:
        return bytes([int(byte.group(1), 16)])
    return piece.replace(SENTENCEPIECE_SPACE, " ").encode()


def _decoder_types(tokenizer) -> set[str]:
    """The kinds of decoder steps of a fast tokenizer (`ByteLevel`, `ByteFallback`, ...); none for
    a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found, pending = set(), [json.loads(backend.to_str()).get("decoder")]
    while pending:
        decoder = pending.pop()
        if isinstance(decoder, dict):
            found.add(decoder.get("type"))
            pending.extend(decoder.get("decoders") or [])
    return found
