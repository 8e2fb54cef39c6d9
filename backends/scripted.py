"""A backend that replies from a script instead of a model.

For exercising the gateway's own logic (limits, usage, queueing, streaming) and for
benchmarks of that logic, where a real model's speed would hide it. Never a product engine.

Options: ``reply`` (text; it is split into words, one token each, and repeated to fill
``max_tokens``), ``token_delay_ms`` (pause before each token), ``end_with_eos`` (whether the
reply ends with EOS once the text is used up, else it repeats until ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from backends.base import BackendCapabilities, GenerationRequest, TokenDelta
from backends.config import BackendConfig

_WORDS = re.compile(r"\s*\S+")


@dataclass
class ScriptedBackend:
    reply: str = "Hello from the scripted backend."
    token_delay_ms: float = 0.0
    end_with_eos: bool = True
    max_concurrency: int = 64
    context_length: int = 4096
    active: int = 0

    @classmethod
    def from_config(cls, config: BackendConfig) -> ScriptedBackend:
        options = config.options
        return cls(
            reply=str(options.get("reply", cls.reply)),
            token_delay_ms=float(options.get("token_delay_ms", 0.0)),
            end_with_eos=bool(options.get("end_with_eos", True)),
            max_concurrency=config.max_concurrency,
            context_length=config.context_length,
        )

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(max_concurrency=self.max_concurrency, context_length=self.context_length)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        words = _WORDS.findall(self.reply) or ["."]
        if not words[0][:1].isspace():
            words[0] = " " + words[0]  # a repeat of the reply must not glue onto its last word
        self.active += 1
        try:
            produced = 0
            while True:
                for word in words:
                    if self.token_delay_ms:
                        await asyncio.sleep(self.token_delay_ms / 1000)
                    else:
                        await asyncio.sleep(0)
                    produced += 1
                    text = word.lstrip() if produced == 1 else word
                    if produced >= request.sampling.max_tokens:
                        yield TokenDelta(text, (produced,), "length")
                        return
                    yield TokenDelta(text, (produced,))
                if self.end_with_eos and produced >= request.sampling.min_tokens:
                    yield TokenDelta("", (), "stop")
                    return
        finally:
            self.active -= 1
