"""llama.cpp on the CPU (llama-cpp-python): the backend, its weights conversion and its log routing."""
