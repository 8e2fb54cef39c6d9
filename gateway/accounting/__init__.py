"""Accounting: API keys, limits and budgets, usage rows and prices, and the metering seam the
request path admits through. Nothing here knows the web framework."""
