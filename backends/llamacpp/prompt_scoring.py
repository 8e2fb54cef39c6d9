"""A prompt's own log-probabilities (legacy completions' ``echo``), read while it is evaluated.

``Llama.eval`` keeps only the last position's logits, unless the context was made with
``logits_all``, which holds n_ctx × n_vocab floats for every request. Here the prompt is decoded
in chunks of ``n_batch`` tokens with logits requested for every position, and each position's row
becomes the next token's `TokenLogprob` right after its chunk's decode, so no more than one
chunk's rows exist at a time. The cache starts empty: a reused prefix has no logits left.
Afterwards the context is where ``Llama.eval`` of the whole prompt leaves it (``n_tokens``,
``input_ids``, the last position's logits), so sampling goes on from there and the next request
can reuse the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends.base import TokenLogprob
from backends.llamacpp.logprobs import LogprobReporter, logits_row


def evaluate_scored(llama: Any, prompt: Sequence[int], reporter: LogprobReporter) -> tuple[TokenLogprob, ...]:
    """Evaluate ``prompt`` from an empty cache; one entry per prompt token, the first without a value."""
    llama.reset()
    llama._ctx.kv_cache_seq_rm(-1, 0, -1)
    n_vocab = llama.n_vocab()
    entries = [reporter.first_prompt_token(prompt[0])]
    for start in range(0, len(prompt), llama.n_batch):
        chunk = list(prompt[start : start + llama.n_batch])
        llama._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
        llama._ctx.decode(llama._batch)
        llama.input_ids[start : start + len(chunk)] = chunk
        llama.n_tokens = start + len(chunk)
        # Position i's logits predict token i + 1; the last position's predict the reply.
        for offset, following in enumerate(prompt[start + 1 : start + len(chunk) + 1]):
            entries.append(reporter.entry(logits_row(llama._ctx, offset, n_vocab), following))
    return tuple(entries)
