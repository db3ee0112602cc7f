"""Fixtures shared by every test module (real redis-server processes among them)."""

pytest_plugins = ["tests.redis_servers"]
