"""Incremental detokenization: deltas that concatenate to the decoded text, split characters held."""

from __future__ import annotations

from typing import Any

import pytest

from backends.exllamav2.detokenizer import IncrementalDetokenizer
from tests.backends.exllamav2.fake_engine import EOS, decoder


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        " leading space and  two spaces",
        "Paris is the capital of France.\nNew line.",
        "héllo wörld, naïve café",
        "emoji 🦙🦙 and € signs",
        "中文测试，日本語のテキスト",
        "tabs\tand 1234567 numbers",
    ],
)
def test_deltas_concatenate_to_the_decoded_text(hf_tokenizer: Any, text: str) -> None:
    ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(decoder(hf_tokenizer))
    deltas = [detokenizer.push([token]) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in delta for delta in deltas)


def test_split_character_is_held_until_complete(hf_tokenizer: Any) -> None:
    euro = [hf_tokenizer.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    detokenizer = IncrementalDetokenizer(decoder(hf_tokenizer))
    assert detokenizer.push([hf_tokenizer.token_to_id("▁costs")]) == "costs"
    assert detokenizer.push(euro[:1]) == ""
    assert detokenizer.push(euro[1:2]) == ""
    assert detokenizer.push(euro[2:]) == "€"
    assert detokenizer.push([EOS]) == ""
    assert detokenizer.flush() == ""


def test_flush_emits_an_unfinished_character(hf_tokenizer: Any) -> None:
    detokenizer = IncrementalDetokenizer(decoder(hf_tokenizer))
    assert detokenizer.push([hf_tokenizer.token_to_id("<0xE2>")]) == ""
    assert detokenizer.flush() == "\ufffd"
