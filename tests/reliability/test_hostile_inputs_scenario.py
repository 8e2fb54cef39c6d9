"""The hostile-input scenario of ``bench.faults`` at test scale: hostile requests mixed with ordinary
ones, some abandoned; no 5xx, every error in its API's shape, one usage row per admitted request."""

from __future__ import annotations

import pytest

from bench.faults import hostile_inputs


def assert_invariants(result: hostile_inputs.HostileInputsResult) -> None:
    assert result.ok, result.notes
    assert result.server_errors == 0
    assert result.wrong_shape == 0
    assert not any(status >= 500 for status in result.statuses), result.statuses
    assert result.statuses[400] >= 20  # the hostile cases were answered, not served
    assert result.abandoned > 0


async def test_hostile_inputs_mixed_with_ordinary_traffic() -> None:
    assert_invariants(await hostile_inputs.run(1))


@pytest.mark.long
async def test_hostile_inputs_at_volume() -> None:
    assert_invariants(await hostile_inputs.run(5))
