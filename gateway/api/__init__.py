"""HTTP routes: OpenAI-compatible API, health, and (elsewhere) admin and Replicate-style routes."""
