"""The command line: ``serve``, ``models``, ``db``, ``keys``, ``usage`` and ``tiny-model``."""
