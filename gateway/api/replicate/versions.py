"""Model and version objects, with the version's OpenAPI schema built from ``INPUT_FIELDS``.

Replicate's Python client fetches the version when it runs ``owner/name:version``; an output schema
of string pieces marked ``x-cog-array-type: iterator`` makes ``replicate.run`` return an iterator over
the pieces, as it does for the hosted Llama-2-chat model.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from gateway.api.replicate.inputs import INPUT_FIELDS
from gateway.serving.registry import ModelRuntime

COG_VERSION = "0.8.6"
# Versions carry a creation time; served models have none, so every version shows this fixed one.
VERSION_CREATED_AT = datetime.fromtimestamp(1_690_000_000, UTC)
_VERSION_HASH = re.compile(r"[0-9a-f]{64}")


def version_id(runtime: ModelRuntime) -> str:
    """The model's version id: its first alias that looks like a Replicate version hash, else its name."""
    return next((a for a in runtime.config.aliases if _VERSION_HASH.fullmatch(a)), runtime.name)


def _input_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for order, field in enumerate(INPUT_FIELDS):
        prop: dict[str, Any] = {
            "type": field.type,
            "title": field.name.replace("_", " ").title(),
            "description": field.description,
            "x-order": order,
        }
        for key, value in (("default", field.default), ("minimum", field.minimum), ("maximum", field.maximum)):
            if value is not None:
                prop[key] = value
        properties[field.name] = prop
    required = [f.name for f in INPUT_FIELDS if f.required]
    return {"type": "object", "title": "Input", "required": required, "properties": properties}


def openapi_schema() -> dict[str, Any]:
    output = {
        "type": "array",
        "items": {"type": "string"},
        "title": "Output",
        "x-cog-array-type": "iterator",
        "x-cog-array-display": "concatenate",
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {"Input": _input_schema(), "Output": output}},
    }


def version_json(version: str) -> dict[str, Any]:
    return {
        "id": version,
        "created_at": VERSION_CREATED_AT.isoformat().replace("+00:00", "Z"),
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(),
    }


def model_json(runtime: ModelRuntime, owner: str, name: str, base_url: str) -> dict[str, Any]:
    return {
        "url": f"{base_url}/v1/models/{owner}/{name}",
        "owner": owner,
        "name": name,
        "description": f"Served by this gateway as {runtime.name}.",
        "visibility": "private",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version_json(version_id(runtime)),
    }
