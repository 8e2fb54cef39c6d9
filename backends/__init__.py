"""Inference engines behind one protocol (see `backends.base`).

A backend turns prompt token ids into a stream of token deltas. It knows nothing of HTTP,
API keys, prices or prompt templates.
"""
