"""Local engines in a process of their own, driven over a Unix socket pair. Modules::

backend   `EngineProcessBackend`: the backend protocol in the gateway, the process's life
server    the engine process: one backend, its generations as tasks
wire      the frames between them (msgpack, each behind its length)
"""
