#!/usr/bin/env python3
"""Cluster mode on one Redis, measured with the project's load generator (ringcast-load).

    python3 benches/cluster.py                 # C1 to C4 (about 5 minutes here)
    python3 benches/cluster.py --quick         # small counts, a smoke test
    python3 benches/cluster.py --only c4       # one scenario

C1, latency: 1,000 subscribers over 100 channels, 1,000 msg/s, one message per publish request
on 4 publisher connections, for each of
  - single:  one node, in memory (no Redis);
  - local:   one node on Redis, publishers and subscribers on it;
  - across:  two nodes on Redis, subscribers on node A, publishers on node B.
It reports publish -> delivery P50/P99 (measured by the subscribers), the publish answer's
P50/P99 and the server's CPU per delivery.

C3, drain: 10,000 subscribers over 100 channels on node A, publishers (1,000 msg/s, 4
connections) on node B; node A gets SIGTERM 5 s into the publishing and its subscribers resume
on node B (the generator's --failover-addr); every subscriber must end with every message.

C2, what one Redis sustains: one node on Redis, 100 subscribers over 100 channels, publishers
asking for far more than it can take (one message per request, 32 connections), so the
achieved publish rate is the bound; Redis's own CPU per message is read from /proc.

C4, the control plane: N idle subscribers connect (256 attempts in flight per generator
thread) to one node in memory, then to one node on Redis, where every handshake is counted
in Redis (one script call) and every 10 s the node refreshes its connections there (registry,
counts, lease). Reports the connect time of each and Redis's CPU per refresh of N connections
(Redis CPU over 31 s of holding them, divided by the 3 refreshes in that time).

Starts its own redis-server (no persistence) on a free loopback port and its own ringcast
nodes, and stops every process it started, by PID. Writes the reports to --out (JSON).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios  # noqa: E402  (the load generator's runner, shared)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
SECRET = "bench-secret-0123456789"
API_KEY = "bench-key-0123456789"
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_secs(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Proc:
    def __init__(self, args, env=None, wait_line=None):
        self.p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        if wait_line:
            for line in self.p.stdout:
                if line.startswith(wait_line):
                    break
            else:
                raise RuntimeError(f"{args[0]} did not start")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def redis_server():
    port = free_port()
    r = Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
              "--appendonly", "no"])
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return r, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def node(redis_port=None, prefix="bench"):
    port = free_port()
    env = dict(os.environ, RINGCAST_LISTEN=f"127.0.0.1:{port}", RINGCAST_LOG="warn",
               RINGCAST_JWT_SECRET=SECRET, RINGCAST_API_KEY=API_KEY,
               RINGCAST_MAX_CONNECTIONS_PER_USER="0", RINGCAST_MAX_CONNECTIONS_PER_PROJECT="0",
               RINGCAST_CONNECTION_RATE_LIMIT="0", RINGCAST_NODE_RATE_LIMIT="0")
    if redis_port:
        env.update(RINGCAST_REDIS_URL=f"redis://127.0.0.1:{redis_port}", RINGCAST_REDIS_PREFIX=prefix)
    return Proc([os.path.join(REL, "ringcast")], env, "listening on "), port


def load(label, sub_port, pub_port, server_pid, **kw):
    args = [os.path.join(REL, "ringcast-load"), "--target", "ringcast",
            "--addr", f"127.0.0.1:{sub_port}", "--publish-addr", f"127.0.0.1:{pub_port}",
            "--server-pid", str(server_pid), "--json", "-", "--label", label,
            "--secret", SECRET, "--api-key", API_KEY]
    return scenarios.run_load(args, kw, f"{label:10}")


def c1(q):
    shape = dict(subscribers=q["subs"], channels=100, rate=1000, duration=q["dur"], batch=1,
                 publishers=4)
    results = []
    # single: in memory
    a, pa = node()
    try:
        results.append(dict(load("C1 single", pa, pa, a.p.pid, **shape), setup="single"))
    finally:
        a.stop()
    for setup in ("local", "across"):
        redis, rport = redis_server()
        a, pa = node(rport)
        b, pb = node(rport) if setup == "across" else (None, pa)
        try:
            r0 = cpu_secs(redis.p.pid)
            r = load(f"C1 {setup}", pa, pb, a.p.pid, **shape)
            r["redis_cpu_secs"] = cpu_secs(redis.p.pid) - r0
            r["setup"] = setup
            results.append(r)
        finally:
            if b:
                b.stop()
            a.stop()
            redis.stop()
    return results


def c2(q):
    redis, rport = redis_server()
    a, pa = node(rport)
    try:
        r0 = cpu_secs(redis.p.pid)
        t0 = time.time()
        r = load("C2", pa, pa, a.p.pid, subscribers=100, channels=100, rate=q["c2_rate"],
                 duration=q["dur"], batch=1, publishers=32)
        r["redis_cpu_secs"] = cpu_secs(redis.p.pid) - r0
        r["wall_secs"] = time.time() - t0
        r["redis_cpu_us_per_message"] = r["redis_cpu_secs"] * 1e6 / max(1, r["published"])
        r["setup"] = "local"
        return [r]
    finally:
        a.stop()
        redis.stop()


def c3(q):
    """A drained node's subscribers resume on another node while publishing goes on."""
    redis, rport = redis_server()
    a, pa = node(rport)
    b, pb = node(rport)
    try:
        r = load("C3", pa, pb, b.p.pid, subscribers=q["c3_subs"], channels=100, rate=1000,
                 duration=q["c3_dur"], batch=1, publishers=4, failover_addr=f"127.0.0.1:{pb}",
                 drain_pid=a.p.pid, drain_at=q["c3_at"])
        r["setup"] = "drain"
        return [r]
    finally:
        b.stop()
        a.stop()
        redis.stop()


def hold(label, port, server_pid, subscribers, secs, redis=None):
    """Connects `subscribers` idle clients, holds them `secs` (Redis CPU measured meanwhile)."""
    args = [os.path.join(REL, "ringcast-load"), "--target", "ringcast", "--mode", "idle",
            "--addr", f"127.0.0.1:{port}", "--subscribers", str(subscribers), "--channels", "100",
            "--server-pid", str(server_pid), "--json", "-", "--label", label, "--hold",
            "--secret", SECRET, "--api-key", API_KEY]
    print(f"  {label:10} {' '.join(args[1:])}", file=sys.stderr, flush=True)
    gen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    report = json.loads(gen.stdout.readline())
    report["command"] = " ".join(args)
    r0 = cpu_secs(redis.p.pid) if redis else 0.0
    time.sleep(secs)
    if redis:
        report["redis_cpu_secs_holding"] = cpu_secs(redis.p.pid) - r0
    gen.stdin.close()
    gen.wait(timeout=60)
    return report


def c4(q):
    n = q["c4_subs"]
    a, pa = node()
    try:
        single = dict(hold("C4 single", pa, a.p.pid, n, 1), setup="single")
    finally:
        a.stop()
    redis, rport = redis_server()
    a, pa = node(rport)
    try:
        r0 = cpu_secs(redis.p.pid)
        on_redis = hold("C4 redis", pa, a.p.pid, n, 31, redis)
        on_redis["setup"] = "local"
        on_redis["redis_cpu_us_per_refresh"] = on_redis["redis_cpu_secs_holding"] * 1e6 / 3
        on_redis["redis_cpu_secs"] = cpu_secs(redis.p.pid) - r0
    finally:
        a.stop()
        redis.stop()
    for r in (single, on_redis):
        r.setdefault("publish_rate", 0.0)
    print(f"C4 connect {n}: in memory {single['connect_secs']:.2f} s, on Redis "
          f"{on_redis['connect_secs']:.2f} s ({on_redis['connect_secs'] / single['connect_secs']:.2f}x); "
          f"Redis CPU per refresh of {n} connections {on_redis['redis_cpu_us_per_refresh'] / 1000:.1f} ms",
          file=sys.stderr)
    return [single, on_redis]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["c1", "c2", "c3", "c4"], help="run one scenario")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-cluster.json"))
    args = ap.parse_args()
    q = (dict(subs=200, dur=5, c2_rate=5000, c3_subs=1000, c3_dur=6, c3_at=2, c4_subs=1000)
         if args.quick
         else dict(subs=1000, dur=15, c2_rate=30000, c3_subs=10000, c3_dur=15, c3_at=5,
                   c4_subs=10000))
    scenarios_run = {"c1": c1, "c2": c2, "c3": c3, "c4": c4}
    chosen = [args.only] if args.only else list(scenarios_run)
    results = [r for name in chosen for r in scenarios_run[name](q)]
    for r in results:
        print(f"{r['label']:10} publish {r['publish_rate']:8.0f}/s  delivery P50 {r['latency_p50_ms']:7.2f} "
              f"P99 {r['latency_p99_ms']:7.2f} ms  answer P50 {r['publish_answer_p50_ms']:6.2f} "
              f"P99 {r['publish_answer_p99_ms']:6.2f} ms  cpu/delivery {r['server_cpu_us_per_delivery']:6.2f} us  "
              f"lost {r['lost']} dup {r['duplicates']}"
              + (f"  moved {r['failed_over']} of {r['connected']}" if r.get("failed_over") is not None else "")
              + (f"  redis cpu/msg {r['redis_cpu_secs'] * 1e6 / max(1, r['published']):.1f} us"
                 if "redis_cpu_secs" in r else ""))
    json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results},
              open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
