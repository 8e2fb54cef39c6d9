"""API keys: generation, storage as hashes, and cached authentication."""

from gateway.accounting.keys.records import (
    KEY_PREFIX,
    ApiKeyInfo,
    BudgetPeriod,
    InvalidKeyFields,
    KeyNotFound,
    KeyUpdate,
    NewKey,
    Scope,
    display_prefix,
    generate_key,
    hash_key,
    key_fields,
)
from gateway.accounting.keys.store import KeyStore

__all__ = [
    "KEY_PREFIX",
    "ApiKeyInfo",
    "BudgetPeriod",
    "InvalidKeyFields",
    "KeyNotFound",
    "KeyStore",
    "KeyUpdate",
    "NewKey",
    "Scope",
    "display_prefix",
    "generate_key",
    "hash_key",
    "key_fields",
]
