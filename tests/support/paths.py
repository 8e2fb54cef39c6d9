"""Paths the tests share, from the repository root (so no test counts parent folders)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
LLAMA2_REFERENCE = FIXTURES / "llama2-tokenizer"
LLAMA2_TOKENIZER_DIR = REPO_ROOT / "gateway" / "data" / "llama2-tokenizer"
LLAMA2_TOKENIZER_MODEL = LLAMA2_TOKENIZER_DIR / "tokenizer.model"
CHART_DIR = REPO_ROOT / "helm" / "llama-gateway"
