"""A resilient invocation gateway for serverless function endpoints.

One request flows through the stages in :mod:`gateway.pipeline`: route match, account and
function extraction, token bucket, circuit breaker, forward with retries, classification,
and the normalized error envelope. Configuration is loaded once (:mod:`gateway.config`) into
frozen objects; decisions are pure functions (:mod:`gateway.routing`, :mod:`gateway.classify`,
:mod:`gateway.retry`); I/O lives in :mod:`gateway.upstream` (HTTP) and :mod:`gateway.store`
(Redis) only.
"""

__version__ = "0.1.0"
