"""The OpenAI-compatible routes: request bodies in, response bodies and SSE chunks out."""
