"""Tools for developers and tests, not served: the tiny random-weight Llama 2 writer."""
