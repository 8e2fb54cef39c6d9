"""ExLlamaV2 on one or more NVIDIA GPUs (``pip install 'llama-gateway[gpu]'``: exllamav2 0.3.2).

exllamav2 and torch are imported by `ExLlamaV2Backend.start` only, so this package (option parsing,
sampler mapping, incremental detokenization) works on machines without them. One thread owns the
`ExLlamaV2DynamicGenerator`: the event loop hands it jobs and cancellations through a queue and
receives tokens through ``loop.call_soon_threadsafe``, so no forward pass ever runs on the loop.

Modules, each importing only those above it::

    options       the model entry's options, checked (the list of options is there)
    sampling      sampler settings and logit bias from a request
    detokenizer   text deltas from released token ids
    engine        flash-attn, the model directory, importing torch and exllamav2
    guidance      constraints and logprobs: an llguidance-driven filter per job
    messages      what the event loop and the generator thread send each other
    worker        the generator thread
    backend       `ExLlamaV2Backend`
"""

from backends.exllamav2.backend import ExLlamaV2Backend
from backends.exllamav2.options import ExLlamaV2Options, parse_options

__all__ = ["ExLlamaV2Backend", "ExLlamaV2Options", "parse_options"]
