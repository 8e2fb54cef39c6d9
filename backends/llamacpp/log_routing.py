"""llama.cpp's own log lines, routed into Python logging at their true levels.

llama-cpp-python 0.3.36 maps ggml's levels with an outdated table, so routine warnings
(e.g. "n_ctx_seq > n_ctx_train" for every vocabulary-only load) reach stderr as errors.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

logger = logging.getLogger("llama_cpp")
# Its warnings are routine (context sizes of vocabulary-only loads, tensor layouts): errors only,
# unless an operator lowers this logger's level.
logger.setLevel(logging.ERROR)

# ggml_log_level in the bundled llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_callback: Any = None


def route_llama_cpp_logs() -> None:
    """Install the callback once per process; later calls do nothing."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    last_level = logging.DEBUG

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, _: ctypes.c_void_p) -> None:
        nonlocal last_level
        if level != 5:
            last_level = _LEVELS.get(level, logging.INFO)
        message = text.decode("utf-8", errors="replace").rstrip()
        if message and logger.isEnabledFor(last_level):
            logger.log(last_level, message)

    _callback = forward  # ctypes needs the callback object kept alive
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
