"""Replicate-compatible predictions: inputs of the hosted Llama-2-chat model, in-memory prediction
state, and the background runs that fill it.

The routes live in ``gateway.api.replicate.routes``. A prediction is generated, limited and billed exactly
like an OpenAI request (same ``Generation``, same metering, one usage row); only its shape differs.

Errors answered on these routes are RFC 7807 problems, the shape Replicate's clients parse::

    Problem                 {"title", "detail", "status"} with an HTTP status
    └── InvalidInput        422 with "invalid_fields", one entry per rejected input
"""
