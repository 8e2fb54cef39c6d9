"""llama-gateway: an OpenAI-compatible gateway for self-hosted Llama 2."""

__version__ = "0.1.0"
