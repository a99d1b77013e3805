"""Fixtures live in tests/fixtures/; this file only registers them."""

pytest_plugins = [
    "tests.fixtures.pg",
    "tests.fixtures.cluster",
    "tests.fixtures.api",
    "tests.fixtures.redis",
]
