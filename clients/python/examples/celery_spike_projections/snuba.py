"""A stand-in for Snuba: a "query" that takes some time and is refused with RateLimitExceeded
when more than ``limit`` queries run at once, like the real backend in the incident (limit 100,
159 attempted).

Its bookkeeping lives in Redis, so every worker process shares it, and it is the witness the
limiter cannot see: each query INCRs an in-flight counter on entry and DECRs it on exit, and the
highest value ever reached is recorded in the same atomic Lua script. Nothing here talks to
Floodgate.
"""

import os
import random
import time
from typing import Any, Dict, Optional, Tuple

import redis

# The script runs atomically in Redis: the in-flight count and the peaks cannot be torn by
# concurrent workers.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
local attempted = tonumber(redis.call('GET', KEYS[3]) or '0')
if n > attempted then redis.call('SET', KEYS[3], n) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  redis.call('INCR', KEYS[4])
  return -n
end
local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > peak then redis.call('SET', KEYS[2], n) end
redis.call('INCR', KEYS[5])
return n
"""

# Simulated upstream throttling: while the budget is positive, a query is refused with
# RateLimitExceeded before it starts (to exercise the throttle path with a healthy limiter).
_THROTTLE = """
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
if left > 0 then
  redis.call('DECR', KEYS[1])
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""


class RateLimitExceeded(Exception):
    """What the backend raises above its concurrent query limit (Snuba's exception in the seed)."""


class StandInSnuba:
    def __init__(
        self,
        redis_url: str,
        limit: int = 100,
        query_seconds: Tuple[float, float] = (0.05, 0.15),
        prefix: str = "snuba",
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.limit = limit
        self.query_seconds = query_seconds
        p = "{%s}" % prefix  # one hash slot, should this ever run on a Redis Cluster
        self.keys = {
            "inflight": p + ":inflight",
            "peak": p + ":peak",
            "peak_attempted": p + ":peak_attempted",
            "rejected": p + ":rejected",
            "admitted": p + ":admitted",
            "throttle_budget": p + ":throttle_budget",
            "throttled": p + ":throttled_simulated",
            "max_token": p + ":max_token",
        }
        self._enter = self.redis.register_script(_ENTER)
        self._throttle = self.redis.register_script(_THROTTLE)

    @classmethod
    def from_env(cls) -> "StandInSnuba":
        lo = float(os.environ.get("SNUBA_QUERY_MS_MIN", "50")) / 1000.0
        hi = float(os.environ.get("SNUBA_QUERY_MS_MAX", "150")) / 1000.0
        return cls(
            os.environ.get("SNUBA_REDIS_URL")
            or os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            limit=int(os.environ.get("SNUBA_CONCURRENT_LIMIT", "100")),
            query_seconds=(lo, hi),
        )

    def query(
        self, org_id: int, project_id: int, fencing_token: Optional[int] = None
    ) -> Dict[str, Any]:
        """One spike-projection query. Raises RateLimitExceeded above the concurrency limit."""
        if self._throttle(keys=[self.keys["throttle_budget"], self.keys["throttled"]]):
            raise RateLimitExceeded("simulated upstream throttle (org {})".format(org_id))
        n = int(self._enter(
            keys=[self.keys[k] for k in ("inflight", "peak", "peak_attempted", "rejected",
                                         "admitted")],
            args=[self.limit],
        ))
        if n < 0:
            raise RateLimitExceeded(
                "Query on could not be run due to allocation policies, "
                "concurrent queries {} > limit {}".format(-n, self.limit)
            )
        try:
            if fencing_token is not None:
                # A real backend that writes would refuse a token below the highest seen.
                self.redis.eval(
                    "local m = tonumber(redis.call('GET', KEYS[1]) or '0') "
                    "if tonumber(ARGV[1]) > m then redis.call('SET', KEYS[1], ARGV[1]) end",
                    1, self.keys["max_token"], fencing_token,
                )
            time.sleep(random.uniform(*self.query_seconds))
            return {"org_id": org_id, "project_id": project_id,
                    "projected_spike": random.random() < 0.05}
        finally:
            self.redis.decr(self.keys["inflight"])

    def set_throttle_budget(self, n: int) -> None:
        self.redis.set(self.keys["throttle_budget"], n)

    def reset(self) -> None:
        self.redis.delete(*self.keys.values())

    def stats(self) -> Dict[str, int]:
        values = self.redis.mget(*[self.keys[k] for k in (
            "inflight", "peak", "peak_attempted", "rejected", "admitted", "throttled")])
        names = ["inflight", "peak", "peak_attempted", "rejected", "admitted",
                 "simulated_throttles"]
        return {k: int(v or 0) for k, v in zip(names, values)}
