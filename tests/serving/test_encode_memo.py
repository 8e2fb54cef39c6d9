"""``EncodeMemo``: repeated texts are encoded once, with exactly the ids encoding gives."""

from __future__ import annotations

import threading

from gateway.serving.encode_memo import EncodeMemo


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str) -> list[int]:
        self.calls.append(text)
        return [ord(c) for c in text]


def test_a_repeated_text_is_encoded_once() -> None:
    encoder = CountingEncoder()
    memo = EncodeMemo(encoder)
    assert memo("[INST] hi [/INST]") == memo("[INST] hi [/INST]") == encoder("[INST] hi [/INST]")
    assert encoder.calls.count("[INST] hi [/INST]") == 2  # once through the memo, once directly


def test_callers_own_the_lists_they_get() -> None:
    memo = EncodeMemo(CountingEncoder())
    first = memo("abc")
    first.append(0)
    second = memo("abc")
    second.clear()
    assert memo("abc") == [97, 98, 99]


def test_long_texts_are_not_kept() -> None:
    encoder = CountingEncoder()
    memo = EncodeMemo(encoder, max_chars=4)
    memo("abcde")
    memo("abcde")
    assert encoder.calls == ["abcde", "abcde"]
    assert len(memo) == 0


def test_the_least_recently_used_text_goes_first() -> None:
    encoder = CountingEncoder()
    memo = EncodeMemo(encoder, entries=2)
    memo("a")
    memo("b")
    memo("a")  # "b" is now the least recently used
    memo("c")
    assert len(memo) == 2
    encoder.calls.clear()
    memo("a")
    memo("b")
    assert encoder.calls == ["b"]


def test_threads_get_the_ids_of_their_own_text() -> None:
    memo = EncodeMemo(CountingEncoder(), entries=8)
    failures: list[str] = []

    def work(offset: int) -> None:
        for index in range(2000):
            text = f"t{(index + offset) % 20}"
            if memo(text) != [ord(c) for c in text]:
                failures.append(text)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(memo) <= 8
