from __future__ import annotations

import pytest

from gateway.serving.stops import StopMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    """What the client is sent piece by piece, and whether a stop ended it; the rest is flushed."""
    matcher = StopMatcher(stops)
    sent = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        sent.append(text)
        if hit:
            return sent, True
    sent.append(matcher.flush())
    return sent, False


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher(())
    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.feed(" wor") == (" wor", False)
    assert matcher.flush() == ""


def test_stop_inside_one_piece() -> None:
    sent, hit = run(("END",), ["abcENDxyz"])
    assert (sent, hit) == (["abc"], True)


def test_partial_prefix_is_held_across_pieces() -> None:
    matcher = StopMatcher(("\nUser:",))
    assert matcher.feed("Sure.\n") == ("Sure.", False)
    assert matcher.feed("Us") == ("", False)
    assert matcher.feed("er") == ("", False)
    assert matcher.feed(":") == ("", True)


def test_held_prefix_is_released_when_it_cannot_match() -> None:
    matcher = StopMatcher(("\nUser:",))
    assert matcher.feed("a\nUs") == ("a", False)
    assert matcher.feed("ually") == ("\nUsually", False)
    assert matcher.flush() == ""


def test_held_text_is_flushed_at_the_end() -> None:
    sent, hit = run(("STOP",), ["one ST", "O"])
    assert not hit
    assert "".join(sent) == "one STO"
    assert sent[:2] == ["one ", ""]


def test_earliest_of_several_stops_wins() -> None:
    sent, hit = run(("world", "lo w"), ["hel", "lo wor", "ld"])
    assert hit
    assert "".join(sent) == "hel"


def test_overlapping_stops() -> None:
    # "abc" and "bcd" overlap; "abc" completes first and starts earlier.
    sent, hit = run(("bcd", "abc"), ["xa", "b", "c", "d"])
    assert (sent, hit) == (["x", "", ""], True)
    # A stop that is a prefix of another: the shorter one completes first.
    sent, hit = run(("ab", "abc"), ["zab", "c"])
    assert ("".join(sent), hit) == ("z", True)


def test_stop_that_repeats_its_own_prefix() -> None:
    # After "aa" the text could still be the start of "aab" shifted by one.
    sent, hit = run(("aab",), ["a", "a", "a", "b"])
    assert ("".join(sent), hit) == ("a", True)
    sent, hit = run(("aab",), ["a", "a", "a", "c"])
    assert ("".join(sent), hit) == ("aaac", False)


@pytest.mark.parametrize("cut", range(1, 12))
def test_every_split_of_the_text_sends_the_same(cut: int) -> None:
    text = "The answer: 42.\n\nQ: next"
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    sent, hit = run(("\n\nQ:", "###"), pieces)
    assert hit
    assert "".join(sent) == "The answer: 42."
    # Nothing past the stop, nor any part of it, ever went out.
    out = ""
    for piece in sent:
        out += piece
        assert "The answer: 42.".startswith(out)


def test_multibyte_text() -> None:
    sent, hit = run(("→ fin",), ["café ", "→", " fi", "n!"])
    assert (sent, hit) == (["café ", "", "", ""], True)
