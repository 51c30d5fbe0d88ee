"""Fixture plugins: real pools, real postgres and a real daemon."""

import pytest

pytest_plugins = ["tests.fix_pools", "tests.fix_postgres", "tests.fix_daemon"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", nargs="?", const=30.0, type=float, default=None, metavar="MINUTES",
        help="run the model-based soak for MINUTES (default 30)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long model-based run, only with --soak")
