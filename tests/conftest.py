"""Fixture plugins: real pools (fix_pools), real postgres (fix_postgres), a real daemon (fix_daemon)."""

pytest_plugins = ["tests.fix_pools", "tests.fix_postgres", "tests.fix_daemon"]
