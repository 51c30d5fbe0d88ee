"""Fixture plugins: real pools, real postgres and a real daemon."""

pytest_plugins = ["tests.fix_pools", "tests.fix_postgres", "tests.fix_daemon"]
