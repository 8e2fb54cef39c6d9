"""Remote OpenAI-compatible workers: this gateway on a GPU node, vLLM, TGI.

The gateway builds the prompt's token ids and sends them as a token-id prompt to the
worker's ``/v1/completions`` (which every such server accepts), so prompts and their
counts stay the gateway's own. Several ``base_urls`` spread requests over replicas: each new
request goes to the replica in rotation with the fewest requests in flight.

Failover: until a replica has sent the first token, a refused or broken connection, no first
token within ``first_token_timeout_s``, a 5xx or 429 answer, or a stream that is not what OpenAI
sends moves the request to the next replica (``backends.replica_pool`` says in what order, and
when a replica leaves and rejoins the rotation). Any other 4xx is the request's own fault and
fails it there. Once a token has been handed on, a failure fails the generation: the caller has
seen tokens, so nothing is replayed. Every ``probe_interval_s`` a task asks each replica out of
rotation for ``GET {base_url}/models``; an answer below 500 (not 429) brings it back.

Completion token counts come from the worker's final usage chunk. If the stream ends without
one (a client that went away, a broken connection), each received chunk counts as one token.

A request's constraint goes to the worker in the ``guided_json``/``guided_regex``/
``guided_grammar`` field it came from (this gateway and vLLM both take them on
``/v1/completions``), and ``logprobs`` as the legacy endpoint's count; the worker's
log-probabilities come back in the deltas. Prompt log-probabilities (``echo``) are not forwarded.

Options: ``base_url`` or ``base_urls`` (each ending in ``/v1``), ``model`` (the worker's model
name; default: this model's name), ``api_key_env`` (environment variable holding the worker's
key), ``timeout_s`` (read timeout between two reads of a stream, default 600),
``first_token_timeout_s`` (from sending the request to its first token, queueing and prefill at
the worker included, default 30), ``eject_after_failures`` (consecutive failures that take a
replica out of rotation, default 1), ``probe_interval_s`` (default 5); ``max_concurrency`` is the
model's own setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from backends.base import (
    BackendCapabilities,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    ReplicaObserver,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
)
from backends.config import BackendConfig
from backends.http1 import ConnectFailed, Http1Client, Http1Error, Response, Target
from backends.replica_pool import Replica, ReplicaPool, SkipReason

_KNOWN_OPTIONS = {
    "base_url",
    "base_urls",
    "model",
    "api_key_env",
    "timeout_s",
    "first_token_timeout_s",
    "eject_after_failures",
    "probe_interval_s",
}
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 5.0
UPSTREAM_KEEPALIVE_S = 60.0
MAX_SSE_LINE_BYTES = 8 * 1024 * 1024
"""A worker's event longer than this is refused rather than buffered without end."""
MAX_PROBE_BODY_BYTES = 64 * 1024
"""How much of a probe's answer is read; the status is what counts."""


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    base_urls: tuple[str, ...]
    model: str
    api_key: str | None
    timeout_s: float
    first_token_timeout_s: float = 30.0
    eject_after_failures: int = 1
    probe_interval_s: float = 5.0

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
        try:
            parsed = cls(
                base_urls=tuple(str(u).rstrip("/") for u in urls),
                model=str(options.get("model", config.name)),
                api_key=api_key,
                timeout_s=float(options.get("timeout_s", 600)),
                first_token_timeout_s=float(options.get("first_token_timeout_s", 30)),
                eject_after_failures=int(options.get("eject_after_failures", 1)),
                probe_interval_s=float(options.get("probe_interval_s", 5)),
            )
        except (TypeError, ValueError) as exc:
            raise BackendUnavailable(f"model {config.name!r}: an openai option is not a number: {exc}") from exc
        if min(parsed.timeout_s, parsed.first_token_timeout_s, parsed.probe_interval_s) <= 0:
            raise BackendUnavailable(f"model {config.name!r}: openai timeouts and probe_interval_s must be > 0")
        if parsed.eject_after_failures < 1:
            raise BackendUnavailable(f"model {config.name!r}: openai eject_after_failures must be >= 1")
        return parsed


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
    if request.constraint is not None:
        body.update(request.constraint.source)
    if request.logprobs is not None:
        body["logprobs"] = request.logprobs
    return body


class _Skip(Exception):
    """The replica failed before the first token: the request moves on to the next one."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# What a worker's stream can raise once it has started: a broken connection, a read timeout,
# events that are not what OpenAI sends.
_STREAM_ERRORS = (GenerationFailed, Http1Error, TimeoutError, ValueError, KeyError, TypeError, AttributeError)


class OpenAIUpstreamBackend:
    def __init__(self, config: BackendConfig) -> None:
        self._config = config
        self._options = UpstreamOptions.from_config(config)
        self._pool = ReplicaPool(
            config.name, self._options.base_urls, eject_after_failures=self._options.eject_after_failures
        )
        self._client: Http1Client | None = None
        self._prober: asyncio.Task[None] | None = None
        headers = {"Content-Type": "application/json"}
        if self._options.api_key:
            headers["Authorization"] = f"Bearer {self._options.api_key}"
        # Each replica's requests, split and written out once: only the length and body vary.
        self._completions: dict[str, tuple[Target, bytes]] = {}
        self._models: dict[str, tuple[Target, bytes]] = {}
        for replica in self._pool.replicas:
            for table, path, method in ((self._completions, "/completions", "POST"), (self._models, "/models", "GET")):
                target = Target.parse(replica.url + path)
                table[replica.url] = (target, target.head(method, headers))
        # Fixed by the configuration, and read several times per request.
        self._capabilities = BackendCapabilities(
            max_concurrency=config.max_concurrency,
            context_length=config.context_length,
            supports_constraints=True,
            supports_logprobs=True,
        )

    @property
    def capabilities(self) -> BackendCapabilities:
        return self._capabilities

    def observe_replicas(self, observer: ReplicaObserver) -> None:
        self._pool.observe(observer)

    async def start(self) -> None:
        # backends.http1 rather than aiohttp or httpx: this client sits on every request the
        # gateway forwards, and there it costs a fifth of aiohttp's CPU time (bench/request_steps.py).
        self._client = Http1Client(connect_timeout_s=CONNECT_TIMEOUT_S, keepalive_s=UPSTREAM_KEEPALIVE_S)
        self._prober = asyncio.create_task(self._probe_periodically(self._client), name=f"probe {self._config.name}")

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        if self._client is not None:
            self._client.close()
            self._client = None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        client = self._client
        if client is None:
            raise BackendUnavailable(f"model {self._config.name!r} is not started")
        body = msgspec.json.encode(request_body(self._options.model, request))
        skips: list[str] = []
        for replica in self._pool.order():
            replica.in_flight += 1
            try:
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        deltas, first = await self._first_delta(client, stack, replica, body)
                    except _Skip as skip:
                        self._pool.skipped(replica, skip.reason, skip.detail)
                        skips.append(f"{replica.url}: {skip.detail}")
                        continue
                    self._pool.served(replica)
                    yield replace(first, replica=replica.url)
                    try:
                        async for delta in deltas:
                            yield delta
                    except _STREAM_ERRORS as exc:
                        self._pool.failed(replica)
                        raise GenerationFailed(f"worker {replica.url} failed: {_describe(exc)}") from exc
                    self._pool.succeeded(replica)
                    return
            finally:
                replica.in_flight -= 1
        raise GenerationFailed(f"no worker of model {self._config.name!r} started the generation: {'; '.join(skips)}")

    async def _first_delta(
        self, client: Http1Client, stack: contextlib.AsyncExitStack, replica: Replica, body: bytes
    ) -> tuple[AsyncGenerator[TokenDelta], TokenDelta]:
        """The replica's stream and its first delta, or ``_Skip``; a 4xx of the request's own raises."""
        limit = self._options.first_token_timeout_s
        refused: str | None = None
        try:
            async with asyncio.timeout(limit):
                target, head = self._completions[replica.url]
                response = await stack.enter_async_context(
                    await client.request(target, head, body, read_timeout_s=self._options.timeout_s)
                )
                if response.status != 200:
                    detail = f"answered {response.status}: " + (await response.read(500)).decode(errors="replace")
                    if response.status == 429:
                        raise _Skip("status_429", detail)
                    if response.status >= 500:
                        raise _Skip("status_5xx", detail)
                    refused = detail
                else:
                    deltas = _deltas(response)
                    # Closed here rather than left to the garbage collector: a generation ends on
                    # its finish delta without asking for more, and an async generator dropped
                    # unfinished costs the event loop a task of its own (its finalizer's aclose).
                    stack.push_async_callback(deltas.aclose)
                    return deltas, await anext(deltas)
        except ConnectFailed as exc:
            raise _Skip("connect_error", _describe(exc)) from exc
        except TimeoutError as exc:
            raise _Skip("timeout", f"no first token within {limit:g} s ({_describe(exc)})") from exc
        except Http1Error as exc:
            raise _Skip("disconnected", _describe(exc)) from exc
        except (GenerationFailed, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Skip("stream_error", _describe(exc)) from exc
        raise GenerationFailed(f"worker {replica.url} {refused}")

    async def _probe_periodically(self, client: Http1Client) -> None:
        while True:
            await asyncio.sleep(self._options.probe_interval_s)
            out = self._pool.out_of_rotation()
            if out:
                await asyncio.gather(*(self._probe(client, replica) for replica in out))

    async def _probe(self, client: Http1Client, replica: Replica) -> None:
        target, head = self._models[replica.url]
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with await client.request(target, head) as response:
                    await response.read(MAX_PROBE_BODY_BYTES)
                    answering = response.status < 500 and response.status != 429
        except (Http1Error, TimeoutError):
            return
        if answering:
            self._pool.restore(replica, via="probe")


async def _sse_batches(content: Response) -> AsyncIterator[list[bytes]]:
    """The ``data:`` payloads of a server-sent event stream, as many at a time as have arrived,
    read to its very end.

    Reading to the end, even past ``[DONE]``, lets the connection go back to the pool: a response
    left half-read would be closed, and the next request would pay for a new connection.
    """
    pending = b""
    while piece := await content.readany():
        # readany gives one chunk of the body at a time; whatever else has arrived joins it.
        pending += piece + content.read_nowait()
        if len(pending) > MAX_SSE_LINE_BYTES and b"\n" not in pending:
            raise GenerationFailed(f"worker sent a line longer than {MAX_SSE_LINE_BYTES} bytes")
        *lines, pending = pending.split(b"\n")
        batch = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if batch:
            yield batch
    if pending.startswith(b"data:"):
        yield [pending[5:].strip()]


async def _deltas(content: Response) -> AsyncGenerator[TokenDelta]:
    """One delta for the tokens of each read: events that arrived together go on together, so a
    fast worker's tokens cost the layers above one step per read, not one per token."""
    counted = 0
    finish: str | None = None
    text_pending = ""
    total: int | None = None
    logprobs: list[TokenLogprob] = []
    async for batch in _sse_batches(content):
        texts: list[str] = []
        for data in batch:
            if data == b"[DONE]" or total is not None:
                continue  # nothing after the usage chunk matters, but the stream is read to its end
            chunk = msgspec.json.decode(data)
            if not isinstance(chunk, dict):
                raise GenerationFailed("worker sent an event that is not a JSON object")
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise GenerationFailed(f"worker error: {message}")
            usage = chunk.get("usage")
            if usage:
                # The exact count arrives last; it settles the difference with what was counted so far.
                total = int(usage["completion_tokens"])
                continue
            for choice in chunk.get("choices", []):
                text = choice.get("text") or ""
                if choice.get("logprobs"):
                    logprobs.extend(_logprobs(choice["logprobs"]))
                if (reason := choice.get("finish_reason")) is not None:
                    finish = reason
                    text_pending += text
                else:
                    texts.append(text)
        if texts:
            counted += len(texts)
            yield TokenDelta("".join(texts), (), token_count=len(texts), logprobs=tuple(logprobs))
            logprobs = []
    final_count = 0 if total is None else max(0, total - counted)
    yield TokenDelta(text_pending, (), _finish(finish), token_count=final_count, logprobs=tuple(logprobs))


def _logprobs(columns: dict[str, Any]) -> list[TokenLogprob]:
    """A legacy completion chunk's logprob columns, one entry per token."""
    tokens = columns.get("tokens") or []
    values = columns.get("token_logprobs") or []
    tops = columns.get("top_logprobs") or []
    entries = []
    for position, token in enumerate(tokens):
        value = values[position] if position < len(values) else None
        top = tops[position] if position < len(tops) and tops[position] else {}
        alternatives = sorted(((str(t).encode(), float(v)) for t, v in top.items()), key=lambda a: -a[1])
        entries.append(TokenLogprob(str(token).encode(), None if value is None else float(value), tuple(alternatives)))
    return entries


def _finish(reason: str | None) -> Any:
    return "length" if reason == "length" else "stop"


def _describe(error: BaseException) -> str:
    # A timeout's message is empty.
    return str(error) or type(error).__name__
