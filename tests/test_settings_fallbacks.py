"""Settings: a model's ``fallbacks`` must name other configured models, each once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import ConfigError, load_settings


def _model(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "backend": "scripted", "template": "llama-2", **fields}


def _load(tmp_path: Path, *models: dict[str, Any]) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": list(models)}), encoding="utf-8")
    return load_settings(path, environ={})


def test_fallbacks_may_name_other_models_and_their_aliases(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        _model("a", fallbacks=["b", "c-alias"]),
        _model("b"),
        _model("c", aliases=["c-alias"]),
    )
    assert settings.models[0].fallbacks == ["b", "c-alias"]
    assert settings.models[1].fallbacks == []


@pytest.mark.parametrize(
    ("fallbacks", "message"),
    [
        (["nope"], "model 'a': fallback 'nope' is not a configured model"),
        (["a"], "model 'a': fallback 'a' is the model itself"),
        (["a-alias"], "model 'a': fallback 'a-alias' is the model itself"),
        (["b", "b-alias"], "model 'a': fallback 'b-alias' names 'b' twice"),
    ],
)
def test_a_fallback_that_is_unknown_itself_or_twice_fails_the_config(
    tmp_path: Path, fallbacks: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, _model("a", aliases=["a-alias"], fallbacks=fallbacks), _model("b", aliases=["b-alias"]))
