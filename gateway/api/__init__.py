"""The HTTP surface: the Litestar app and its routes (OpenAI, Replicate, admin, usage, probes),
authentication, request ids, and running it under uvicorn."""
