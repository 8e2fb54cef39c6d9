"""Fault scenarios run against real gateways; ``python -m bench.faults`` prints their report.

Each scenario module exposes ``run(scale) -> ScenarioResult``; the reliability tests run the same
functions at a small scale and assert the invariants, the report runs them at full scale.
"""
