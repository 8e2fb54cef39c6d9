"""Stop sequences applied to streamed text, so a partial match never reaches the client."""

from __future__ import annotations


class StopMatcher:
    """Feeds text through; holds back any tail that could still become a stop sequence.

    ``feed`` returns the text that is safe to send and whether a stop sequence was hit; once
    hit, the text from the stop sequence on is dropped and the generation should end.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation has ended without a stop."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, buffer: str) -> int:
        for size in range(min(self._longest - 1, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
