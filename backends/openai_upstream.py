"""Remote OpenAI-compatible workers: this gateway on a GPU node, vLLM, TGI.

The gateway builds the prompt's token ids and sends them as a token-id prompt to the
worker's ``/v1/completions`` (which every such server accepts), so prompts and their
counts stay the gateway's own. Several ``base_urls`` spread requests over replicas: each new
request goes to the replica with the fewest requests in flight, and a replica that refuses
the connection is skipped before any token was produced.

Completion token counts come from the worker's final usage chunk. If the stream ends without
one (a client that went away, a broken connection), each received chunk counts as one token.

Options: ``base_url`` or ``base_urls`` (each ending in ``/v1``), ``model`` (the worker's model
name; default: this model's name), ``api_key_env`` (environment variable holding the worker's
key), ``timeout_s`` (read timeout, default 600), ``max_concurrency`` is the model's own setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from backends.base import (
    BackendCapabilities,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from backends.config import BackendConfig

_KNOWN_OPTIONS = {"base_url", "base_urls", "model", "api_key_env", "timeout_s"}


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    base_urls: tuple[str, ...]
    model: str
    api_key: str | None
    timeout_s: float

    @classmethod
    def from_config(cls, config: BackendConfig) -> UpstreamOptions:
        options = config.options
        unknown = set(options) - _KNOWN_OPTIONS
        if unknown:
            raise BackendUnavailable(f"model {config.name!r}: unknown openai option(s) {', '.join(sorted(unknown))}")
        urls = options.get("base_urls") or ([options["base_url"]] if options.get("base_url") else [])
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise BackendUnavailable(f"model {config.name!r}: the openai backend needs 'base_url' or 'base_urls'")
        key_env = options.get("api_key_env")
        api_key = os.environ.get(str(key_env)) if key_env else None
        if key_env and not api_key:
            raise BackendUnavailable(f"model {config.name!r}: environment variable {key_env} is not set")
        return cls(
            base_urls=tuple(str(u).rstrip("/") for u in urls),
            model=str(options.get("model", config.name)),
            api_key=api_key,
            timeout_s=float(options.get("timeout_s", 600)),
        )


def request_body(model: str, request: GenerationRequest) -> dict[str, Any]:
    """Every sampler field explicit, in the names vLLM and this gateway accept."""
    sampling: SamplingParams = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt_ids),
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "min_p": sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "min_tokens": sampling.min_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed % 2**63
    if sampling.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in sampling.logit_bias.items()}
    return body


class OpenAIUpstreamBackend:
    def __init__(self, config: BackendConfig) -> None:
        self._config = config
        self._options = UpstreamOptions.from_config(config)
        self._in_flight = dict.fromkeys(self._options.base_urls, 0)
        self._client: httpx.AsyncClient | None = None

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            max_concurrency=self._config.max_concurrency, context_length=self._config.context_length
        )

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._options.api_key}"} if self._options.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self._options.timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _replicas(self) -> list[str]:
        return sorted(self._in_flight, key=lambda url: self._in_flight[url])

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        client = self._client
        if client is None:
            raise BackendUnavailable(f"model {self._config.name!r} is not started")
        body = request_body(self._options.model, request)
        last_error: Exception | None = None
        for url in self._replicas():
            self._in_flight[url] += 1
            try:
                async with client.stream("POST", url + "/completions", json=body) as response:
                    if response.status_code != 200:
                        detail = (await response.aread()).decode(errors="replace")[:500]
                        raise GenerationFailed(f"worker {url} answered {response.status_code}: {detail}")
                    async for delta in _deltas(response):
                        yield delta
                    return
            except httpx.ConnectError as exc:
                last_error = exc  # nothing was generated there: try the next replica
            except httpx.HTTPError as exc:
                raise GenerationFailed(f"worker {url} failed: {exc}") from exc
            finally:
                self._in_flight[url] -= 1
        raise GenerationFailed(f"no worker of model {self._config.name!r} is reachable: {last_error}")


async def _deltas(response: httpx.Response) -> AsyncIterator[TokenDelta]:
    counted = 0
    finish: str | None = None
    text_pending = ""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise GenerationFailed(f"worker error: {chunk['error'].get('message')}")
        usage = chunk.get("usage")
        if usage:
            # The exact count arrives last; settle the difference with what was counted so far.
            total = int(usage["completion_tokens"])
            yield TokenDelta(text_pending, (), _finish(finish), token_count=max(0, total - counted))
            return
        for choice in chunk.get("choices", []):
            text = choice.get("text") or ""
            reason = choice.get("finish_reason")
            if reason is not None:
                finish = reason
                text_pending += text
                continue
            counted += 1
            yield TokenDelta(text, (), token_count=1)
    yield TokenDelta(text_pending, (), _finish(finish), token_count=0)


def _finish(reason: str | None) -> Any:
    return "length" if reason == "length" else "stop"
