#!/usr/bin/env python3
"""A holder process for the crash test (tests/crash.rs): takes permits from a Floodgate server
over HTTP and "works" while holding them, telling an independent witness when its work starts
and stops. It rides out server restarts the way a real client must:

- an acquire is retried on connection errors with the same request_id, so a grant the server
  made (and logged) but whose answer was lost is returned again, not granted twice;
- while working it extends every lease/3, retrying connection errors and 503s until its local
  lease deadline (measured from when it *sent* the last extend that succeeded, so it is never
  later than the server's); it stops working on 410 permit_lost, or when that deadline passes.

Every event is one JSON line on stdout. Standard library only.

usage: holder.py BASE_URL[,BASE_URL...] LIMITER WITNESS_PORT LEASE_MS SEED

With several servers, each request goes to one picked at random (a load balancer).
"""

import http.client
import json
import random
import socket
import sys
import time
import uuid

BASES, LIMITER, WITNESS_PORT, LEASE_MS, SEED = sys.argv[1:6]
WITNESS_PORT, LEASE_MS, SEED = int(WITNESS_PORT), int(LEASE_MS), int(SEED)
SERVERS = [tuple(b.split("//", 1)[1].split(":")) for b in BASES.split(",")]
rng = random.Random(SEED)


def emit(**event):
    print(json.dumps(event), flush=True)


def call(method, path, body, timeout):
    """(status, json) or raises OSError on a connection problem."""
    host, port = rng.choice(SERVERS)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else {})
    except (http.client.HTTPException, ValueError) as e:
        raise OSError(str(e))
    finally:
        conn.close()


def acquire():
    request_id = uuid.uuid4().hex
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        try:
            status, body = call(
                "POST",
                f"/v1/limiters/{LIMITER}/acquire",
                {"wait_ms": 20000, "lease_ms": LEASE_MS, "request_id": request_id,
                 "holder": f"holder-{SEED}"},
                timeout=30,
            )
        except OSError:
            time.sleep(0.05)  # the server is restarting: retry with the same request_id
            continue
        if status == 200:
            return body, request_id
        if status in (429, 503):
            time.sleep(0.05)
            continue
        emit(ev="acquire_error", status=status, body=body)
        time.sleep(0.2)
    return None, request_id


class Witness:
    def __init__(self):
        self.sock = socket.create_connection(("127.0.0.1", WITNESS_PORT))

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def exit(self):
        # Wait for the witness to count the exit before the permit can go to anyone else.
        self.send("exit")
        self.sock.recv(16)
        self.sock.close()


def work(permit, request_id):
    token = permit["fencing_token"]
    permit_id = permit["permit_id"]
    sent = time.monotonic()  # the acquire answered: the lease runs from at least now
    deadline = sent + LEASE_MS / 1000.0 * 0.9
    witness = Witness()
    witness.send(f"enter {token}")
    emit(ev="granted", token=token, request_id=request_id)
    hold_until = time.monotonic() + rng.choice([0.05, 0.1, 0.2, 0.4, 1.0, 3.0, 6.0, 9.0])
    next_extend = time.monotonic() + LEASE_MS / 3000.0
    outcome = "done"
    while time.monotonic() < hold_until:
        now = time.monotonic()
        if now >= deadline:
            outcome = "expired_local"
            break
        if now >= next_extend:
            attempt = time.monotonic()
            try:
                status, body = call(
                    "POST", f"/v1/permits/{permit_id}/extend",
                    {"lease_ms": LEASE_MS, "permits": permit["permits"]}, timeout=1)
            except OSError:
                status = None
            if status == 200:
                deadline = attempt + LEASE_MS / 1000.0 * 0.9
                next_extend = attempt + LEASE_MS / 3000.0
            elif status == 410:
                outcome = "lost_alive"
                break
            else:
                next_extend = time.monotonic() + 0.05  # unreachable or 503: retry soon
        time.sleep(0.01)
    witness.exit()
    emit(ev=outcome, token=token)
    if outcome == "done":
        for _ in range(50):
            try:
                call("POST", f"/v1/permits/{permit_id}/release", {}, timeout=2)
                break
            except OSError:
                time.sleep(0.05)


def main():
    while True:
        permit, request_id = acquire()
        if permit is not None:
            work(permit, request_id)


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
