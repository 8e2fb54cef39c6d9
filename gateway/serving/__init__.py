"""Serving models: the registry of configured models, prompts, tokenizers, queueing, generation
and stop sequences."""
