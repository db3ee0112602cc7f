"""Fixtures shared by every test module (real redis-server processes among them)."""

from hypothesis import Phase, settings

pytest_plugins = ["tests.redis_servers"]

# No "explain" phase: it re-runs a failing example under a tracer, and with a whole gateway
# per example that took minutes before the failure was reported. Shrinking stays on.
settings.register_profile("gateway", phases=[phase for phase in Phase if phase is not Phase.explain])
settings.load_profile("gateway")
