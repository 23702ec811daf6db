"""Starts a spike-projection batch, waits until every query task has completed, and prints what
the backend saw. Run a worker first (see README.md). Exit status 0 when every query completed
exactly once and the backend never saw more concurrent queries than the limiter allows.

    python run_example.py --orgs 20 --projects 30 --concurrency 50
"""

import argparse
import json
import sys
import time

from floodgate import Adaptive, BadRequest, Rate
from floodgate.celery import client_from_env

import spike_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=20, help="organizations (default 20)")
    parser.add_argument("--projects", type=int, default=30,
                        help="projects per organization: one query each (default 30)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="the limiter's concurrency, set before the batch (default 50; "
                             "0 leaves the limiter as it is)")
    parser.add_argument("--adaptive", action="store_true",
                        help="make the limiter adaptive between 1 and --concurrency: the "
                             "throttled feedback of the tasks moves it to what the backend takes")
    parser.add_argument("--fanout-rate", type=float, default=10.0,
                        help="organization tasks started per second by the fan-out "
                             "(default 10; 0: all at once)")
    parser.add_argument("--throttle-budget", type=int, default=0,
                        help="make the backend refuse this many queries with RateLimitExceeded "
                             "first, to show the throttle retry path (default 0)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for completion (default 600)")
    parser.add_argument("--json", action="store_true", help="print the final stats as JSON")
    args = parser.parse_args()

    fg = client_from_env()
    if args.concurrency:
        # Defined afresh for the run; max_wait caps the wait of any acquire (the tasks ask for
        # SPIKE_WAIT).
        fg.delete(spike_app.LIMITER)
        if args.adaptive:
            fg.define(spike_app.LIMITER, args.concurrency, lease=spike_app.LEASE, max_wait=60,
                      adaptive=Adaptive(min=1, max=args.concurrency, decrease=0.5,
                                        cooldown=0.1))
        else:
            fg.define(spike_app.LIMITER, args.concurrency, lease=spike_app.LEASE, max_wait=60)
    status = fg.limiter(spike_app.LIMITER)
    limit = status.get("limit") or status["concurrency"]
    fg.delete(spike_app.FANOUT_LIMITER)
    if args.fanout_rate > 0:
        try:
            # One organization every 1/rate seconds (the limit is per period: scale the period
            # so the limit is a whole number of tokens).
            fg.define(spike_app.FANOUT_LIMITER, None,
                      rate=Rate(limit=max(1, round(args.fanout_rate * 10)), period=10.0))
        except BadRequest as e:
            print("note: this server has no rate limits, the fan-out is not paced ({})".format(e),
                  file=sys.stderr)
    spike_app.reset_stats()
    spike_app.snuba().set_throttle_budget(args.throttle_budget)
    expected = args.orgs * args.projects

    started = time.monotonic()
    spike_app.start_spike_projection_batch.delay(args.orgs, args.projects)
    if not args.json:
        print("enqueued a batch of {} organizations x {} projects = {} queries; limiter {} "
              "allows {}, the backend {}".format(args.orgs, args.projects, expected,
                                                 spike_app.LIMITER, limit,
                                                 spike_app.snuba().limit))
    last = -1
    while True:
        s = spike_app.stats()
        done = s["distinct_done"]
        if done != last and not args.json:
            print("  {:6.1f} s  {}/{} done, {} in flight, retries {}".format(
                time.monotonic() - started, done, expected, s["backend"]["inflight"],
                s["retries"]))
            last = done
        if done >= expected or time.monotonic() - started > args.timeout:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    s = spike_app.stats()
    final = fg.limiter(spike_app.LIMITER)
    s.update(expected=expected, limit=limit, elapsed_s=round(elapsed, 2),
             limiter=final["counters"], final_limit=final.get("limit"))
    ok = (
        s["distinct_done"] == expected
        and s["completions"] == expected
        and s["backend"]["rejected"] == 0
        and s["backend"]["peak"] <= limit
        and not s["failures"]
    )
    s["ok"] = ok
    if args.json:
        print(json.dumps(s))
    else:
        b = s["backend"]
        print("completed {}/{} queries in {:.1f} s (each exactly once: {})".format(
            s["distinct_done"], expected, elapsed, s["completions"] == expected))
        print("backend: peak {} concurrent queries (limit {}, limiter {}), {} refused for load, "
              "{} simulated throttles".format(b["peak"], spike_app.snuba().limit, limit,
                                              b["rejected"], b["simulated_throttles"]))
        print("retries: {} (wait = the wait ended, re-enqueued; throttle = backend refused)"
              .format(s["retries"] or "none"))
        print("failures: {}".format(s["failures"] or "none"))
        if args.adaptive:
            print("adaptive limit: started at {}, ended at {} ({} decreases, {} increases)".format(
                limit, final.get("limit"), final["counters"].get("limit_decreases"),
                final["counters"].get("limit_increases")))
        print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
