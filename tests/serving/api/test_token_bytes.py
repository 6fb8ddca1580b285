"""Each token's own bytes from its vocabulary: byte-level BPE (the real tokenizer) and
SentencePiece with byte fallback (a small one built here), special tokens, joined == the text."""

import pytest
import transformers
from kvpilot.serving.api.token_bytes import TokenBytes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TEXT = "Ünïcödé: 日本語 😀👍🏽 done."


@pytest.fixture(scope="module")
def byte_level(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def sentencepiece():
    """Llama 2's layout: `▁` for a space, `<0xNN>` for the bytes of characters not in the vocabulary."""
    merged = ["▁d", "▁do", "▁don", "▁done"]
    pieces = ["<unk>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), "▁", "d", "o", "n", "e", *merged]
    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    merges = [("▁", "d"), ("▁d", "o"), ("▁do", "n"), ("▁don", "e")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def test_byte_level_tokens_rebuild_the_text(byte_level):
    token_ids = byte_level.encode(TEXT, add_special_tokens=False)
    token_bytes = TokenBytes(byte_level)
    spelled = [token_bytes(token_id) for token_id in token_ids]
    assert b"".join(spelled) == TEXT.encode()
    partial = [
        b for token_id, b in zip(token_ids, spelled, strict=True) if "\ufffd" in byte_level.decode([token_id])
    ]
    assert partial and all(b"\xef\xbf\xbd" not in b for b in partial)  # the case is real, and fixed


def test_byte_fallback_tokens_rebuild_the_text(sentencepiece):
    token_ids = sentencepiece.encode("done 日", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(token_ids) == ["▁done", "▁", "<0xE6>", "<0x97>", "<0xA5>"]
    token_bytes = TokenBytes(sentencepiece)
    assert [token_bytes(token_id) for token_id in token_ids] == [b" done", b" ", b"\xe6", b"\x97", b"\xa5"]


@pytest.mark.parametrize("fixture", ["byte_level", "sentencepiece"])
def test_special_tokens_add_nothing_to_a_text_that_skips_them(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes(tokenizer.eos_token_id) == b""
    assert token_bytes(tokenizer.eos_token_id, skip_special_tokens=False) == tokenizer.eos_token.encode()


def test_an_unknown_spelling_falls_back_to_decoding_each_token(byte_level):
    token_bytes = TokenBytes(byte_level)
    token_bytes.by_id.clear()  # as for a tokenizer whose decoder this module does not know
    token_id = byte_level.encode(" done", add_special_tokens=False)[0]
    assert token_bytes(token_id) == b" done"
