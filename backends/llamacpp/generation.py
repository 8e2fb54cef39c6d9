"""One generation on one llama.cpp context, run on its slot's thread.

The sampler chain is built here, per request, with every setting explicit, rather than through
``Llama.generate`` whose defaults (top_k 40, min_p 0.05, ...) are not neutral and whose Python
logits-processor hook cannot express ``min_tokens``. Each step evaluates the last token, lets
the request's grammar (if any) mask the logits in place, samples, and records the token's
log-probability (if asked) from the same masked row; see `grammar` and `logprobs` for what the
mask and the values are. Nothing is computed for a feature the request does not use.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Callable, Sequence
from typing import Any

from backends.base import FinishReason, GenerationFailed, GenerationRequest, SamplingParams, TokenDelta, TokenLogprob
from backends.llamacpp.grammar import GrammarMask, GrammarTokenizer
from backends.llamacpp.logprobs import LogprobReporter, logits_row
from backends.llamacpp.pieces import TokenPieces
from backends.llamacpp.prompt_scoring import evaluate_scored

# Penalties look back over this many tokens, as llama.cpp's own server does by default.
PENALTY_LAST_N = 64
_NEG_INF = float("-inf")


def build_sampler(llama: Any, sampling: SamplingParams, seed: int, ban_eos: bool) -> Any:
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    n_vocab = llama.n_vocab()
    bias = {int(token): float(value) for token, value in sampling.logit_bias.items()}
    if ban_eos:
        bias[llama.token_eos()] = _NEG_INF
    if bias:
        sampler.add_logit_bias(n_vocab, bias)
    sampler.add_penalties(
        n_vocab=n_vocab,
        penalty_last_n=PENALTY_LAST_N,
        penalty_repeat=sampling.repetition_penalty,
        penalty_freq=sampling.frequency_penalty,
        penalty_present=sampling.presence_penalty,
    )
    if sampling.temperature == 0:
        sampler.add_greedy()
        return sampler
    if sampling.top_k > 0:
        sampler.add_top_k(sampling.top_k)
    if sampling.top_p < 1:
        sampler.add_top_p(sampling.top_p, 1)
    if sampling.min_p > 0:
        sampler.add_min_p(sampling.min_p, 1)
    sampler.add_temp(sampling.temperature)
    sampler.add_dist(seed)
    return sampler


def reuse_prefix(llama: Any, prompt: Sequence[int]) -> list[int]:
    """Keep the KV cache for the prompt's longest cached prefix; return what is left to evaluate."""
    cached = llama.n_tokens
    common = 0
    limit = min(cached, len(prompt) - 1)  # at least one token is evaluated to refresh the logits
    input_ids = llama.input_ids
    while common < limit and input_ids[common] == prompt[common]:
        common += 1
    if common and llama._ctx.kv_cache_seq_rm(-1, common, -1):
        llama.n_tokens = common
        return list(prompt[common:])
    llama.reset()
    return list(prompt)


def generate_blocking(
    llama: Any,
    request: GenerationRequest,
    grammar_tokenizer: GrammarTokenizer,
    is_cancelled: Callable[[], bool],
    emit: Callable[[TokenDelta | BaseException], None],
) -> None:
    from llama_cpp import llama_cpp as lib

    if not request.prompt_ids:
        raise GenerationFailed("the prompt has no tokens")
    sampling = request.sampling
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    vocab = llama._model.vocab
    n_vocab = llama.n_vocab()
    eos = llama.token_eos()
    pieces = TokenPieces(vocab)
    # SentencePiece vocabularies put a space before the first word; Meta's reference decode
    # drops it from the reply, and so do we.
    strip_first_space = not request.continuation and lib.llama_vocab_type(vocab) == lib.LLAMA_VOCAB_TYPE_SPM
    grammar = None
    if request.constraint is not None:
        grammar = GrammarMask(grammar_tokenizer.get(vocab), request.constraint.grammar)
    reporter = None
    if request.logprobs is not None:
        reporter = LogprobReporter(request.logprobs, pieces, n_vocab, sampling.logit_bias)
    eos_ban = build_sampler(llama, sampling, seed, ban_eos=True) if sampling.min_tokens > 0 else None
    sampler = build_sampler(llama, sampling, seed, ban_eos=False)
    # Penalties see the prompt's last tokens too, as llama.cpp's server, vLLM and HF apply them.
    for token in request.prompt_ids[-PENALTY_LAST_N:]:
        sampler.accept(token)
        if eos_ban is not None:
            eos_ban.accept(token)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending_ids: list[int] = []
    pending_logprobs: list[TokenLogprob] = []
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    produced = 0
    started_text = False

    def send(text: str, finish: FinishReason | None) -> None:
        nonlocal prompt_logprobs
        ids, logprobs = tuple(pending_ids), tuple(pending_logprobs)
        emit(TokenDelta(text, ids, finish, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
        pending_ids.clear()
        pending_logprobs.clear()
        prompt_logprobs = ()  # the first delta carries them

    try:
        if request.prompt_logprobs is not None:
            prompt_reporter = LogprobReporter(request.prompt_logprobs, pieces, n_vocab)
            prompt_logprobs = evaluate_scored(llama, request.prompt_ids, prompt_reporter)
            to_eval: list[int] = []
        else:
            to_eval = reuse_prefix(llama, request.prompt_ids)
        while True:
            if is_cancelled():
                return
            if to_eval:
                llama.eval(to_eval)
            logits = None
            if grammar is not None or reporter is not None:
                logits = logits_row(llama._ctx, -1, n_vocab)
                if grammar is not None:
                    grammar.apply(logits)
            # min_tokens never pushes a reply out of its grammar: when only EOS is allowed, EOS wins.
            banning = produced < sampling.min_tokens and not (grammar is not None and grammar.allows_only_eos())
            active = eos_ban if eos_ban is not None and banning else sampler
            token = active.sample(llama._ctx, -1)
            other = sampler if active is eos_ban else eos_ban
            if other is not None:
                other.accept(token)
            if token == eos or lib.llama_vocab_is_eog(vocab, token):
                send(decoder.decode(b"", final=True), "stop")
                return
            produced += 1
            pending_ids.append(token)
            if reporter is not None and logits is not None:
                pending_logprobs.append(reporter.entry(logits, token))
            if grammar is not None:
                grammar.consume(token)
            text = decoder.decode(pieces.text(token))
            if not started_text and text:
                if strip_first_space and text.startswith(" "):
                    text = text[1:]
                started_text = True
            complete = grammar is not None and grammar.complete
            finished = complete or produced >= sampling.max_tokens or llama.n_tokens + 1 >= llama.n_ctx()
            if finished:
                text += decoder.decode(b"", final=True)
            if text or finished:
                send(text, "stop" if complete else "length" if finished else None)
            if finished:
                return
            to_eval = [token]
    except Exception:
        # Tokens sampled but not yet sent (a grammar refusing the last one, a character still
        # incomplete) were generated all the same: they are billed, though their text is not shown.
        if pending_ids:
            send("", None)
        raise
    finally:
        sampler.close()
        if eos_ban is not None:
            eos_ban.close()
