"""Fixtures the ops tests share with the inference tests (a real plant broker, aggregator keys)."""

from tests.inference.conftest import aggregator_keys, plant_broker  # noqa: F401 (pytest fixtures)
