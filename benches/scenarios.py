#!/usr/bin/env python3
"""Runs the benchmark scenarios of docs/benchmarks.md against ringcast, the floor and the peers,
one server at a time on loopback, with the project's load generator (ringcast-load).

    python3 benches/scenarios.py                      # everything (about 15 minutes here)
    python3 benches/scenarios.py --quick              # small counts, a smoke test
    python3 benches/scenarios.py --targets ringcast,floor --scenarios S1,S4
    python3 benches/scenarios.py --targets floor,ringcast,ringcast-socketio,socketio --scenarios S1
    python3 benches/scenarios.py --bin-dir /some/dir --quick --syscalls   # other servers' binaries

Writes every report to --out (JSON) and, with --chart, a PNG next to it. Each scenario starts a
fresh server and stops it (by the PID it started) afterwards. Bounded: every load run has a
duration and the generator stops by itself; with --syscalls the generator also counts the
server's system calls over a fixed window inside the publishing (perf stat, which it stops).

S3 publishes one message per request on 16 connections for every target ("single"); S3b is
ringcast's batched publishing (10 messages per request on 4 connections), run only for targets
whose publish API takes batches.

`ringcast-socketio` is the same ringcast server spoken to through its Socket.IO endpoint
(Engine.IO over WebSocket, auth in CONNECT, `subscribe` as an event with an acknowledgement);
it publishes through ringcast's HTTP API exactly like `ringcast`. It is not in the default
--targets (name it); S5 and S6 (resume by seq) run only for `ringcast`.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where `cargo build` puts the binaries (it honours CARGO_TARGET_DIR, relative to ROOT, where
# this script runs it).
REL = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR") or "target", "release")
SECRET = "bench-secret-0123456789"
API_KEY = "bench-key-0123456789"
PORTS = {"ringcast": 18080, "ringcast-socketio": 18081, "floor": 18090, "nchan": 18091,
         "socketio": 18092}
# Targets served by the ringcast binary: `ringcast` over its WebSocket (/ws), `ringcast-socketio`
# over its Socket.IO endpoint (/socket.io/, same server, same settings, same publish API).
RINGCAST = {"ringcast", "ringcast-socketio"}
# Every target, in the order of the tables and the chart.
ALL_TARGETS = ["floor", "ringcast", "ringcast-socketio", "nchan", "socketio"]
# The binaries: servers from BIN_DIR (--bin-dir), the generator from LOAD_BIN (--load-bin).
BIN_DIR = REL
LOAD_BIN = os.path.join(REL, "ringcast-load")
SYSCALLS = False  # --syscalls: count the server's syscalls in every publishing run
BATCHING = set(RINGCAST)  # targets whose publish API takes several messages per request
S3_SINGLE = dict(batch=1, publishers=16)
S3_BATCH = dict(batch=10, publishers=4)


def peer_missing(target):
    """What a peer's start.sh would have to install first (empty: nothing)."""
    if target == "nchan":
        ok = shutil.which("nginx") and subprocess.run(
            ["dpkg", "-s", "libnginx-mod-nchan"], capture_output=True).returncode == 0
        return "" if ok else "nginx and libnginx-mod-nchan (Debian packages)"
    if target == "socketio":
        here = os.path.join(ROOT, "benches", "peers", "socketio", "node_modules", "socket.io")
        return "" if os.path.isdir(here) else "the npm packages of benches/peers/socketio"
    return ""


class Server:
    """One running target; stop() ends only what start() began."""

    def __init__(self, target):
        self.target = target
        self.port = PORTS[target]
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = None
        self.pid = None

    def start(self):
        env = dict(os.environ, RINGCAST_LISTEN=self.addr, RINGCAST_LOG="warn")
        if self.target in RINGCAST or self.target == "floor":
            binary = "ringcast" if self.target in RINGCAST else "ringcast-floor"
            env.update(RINGCAST_JWT_SECRET=SECRET, RINGCAST_API_KEY=API_KEY,
                       # one bench user holds all the connections
                       RINGCAST_MAX_CONNECTIONS_PER_USER="0",
                       RINGCAST_MAX_CONNECTIONS_PER_PROJECT="0",
                       # throughput runs measure the server, not its throttles
                       RINGCAST_CONNECTION_RATE_LIMIT="0", RINGCAST_NODE_RATE_LIMIT="0")
            self.proc = subprocess.Popen(
                [os.path.join(BIN_DIR, binary)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True)
            for line in self.proc.stdout:
                if line.startswith("listening on "):
                    break
            else:
                raise RuntimeError(f"{binary} did not start")
            self.pid = self.proc.pid
        else:
            script = os.path.join(ROOT, "benches", "peers", self.target, "start.sh")
            out = subprocess.run([script, str(self.port)], check=True, capture_output=True,
                                 text=True, timeout=600).stdout
            self.pid = int(next(l.split()[1] for l in out.splitlines() if l.startswith("pid ")))
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            script = os.path.join(ROOT, "benches", "peers", self.target, "stop.sh")
            subprocess.run([script, str(self.port)], check=False, capture_output=True, timeout=60)
        time.sleep(0.5)  # let the kernel finish closing the sockets before the next run


def load(server, label, **kw):
    if SYSCALLS and kw.get("mode", "fanout") != "idle":
        kw["syscalls"] = True  # a window inside the publishing; see ringcast-load --help
    args = [LOAD_BIN, "--target", server.target, "--addr", server.addr,
            "--server-pid", str(server.pid), "--json", "-", "--label", label,
            "--secret", SECRET, "--api-key", API_KEY]
    return run_load(args, kw, f"{server.target:17} {label:12}", shown_from=13)


def run_load(args, kw, title, shown_from=1):
    """Runs the load generator with `args` and the options `kw`; returns its JSON report with
    the exact command in it."""
    for k, v in kw.items():
        args = args + [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    print(f"  {title} {' '.join(args[shown_from:])}", file=sys.stderr, flush=True)
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        raise RuntimeError(f"ringcast-load failed: {title.strip()}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["command"] = " ".join(args)
    return report


def fresh(target, fn):
    server = Server(target).start()
    try:
        return fn(server)
    finally:
        server.stop()


def s1(target, q):
    return [fresh(target, lambda s: load(s, "S1", subscribers=q["subs"], channels=1, rate=10,
                                         duration=q["dur"]))]


def s2(target, q):
    """Highest rate one in-order publisher holds with P99 < 100 ms, no loss, on schedule."""
    runs = []
    for rate in q["s2_rates"]:
        r = fresh(target, lambda s: load(s, f"S2@{rate}", subscribers=q["subs"], channels=1,
                                         rate=rate, duration=q["s2_dur"]))
        r["s2_pass"] = (r["latency_p99_ms"] < 100 and r["lost"] == 0 and r["failed"] == 0
                        and r["publish_rate"] >= 0.95 * rate)
        runs.append(r)
        if not r["s2_pass"]:
            break
    return runs


def s3_run(target, q, label, mode, shape):
    kw = dict(subscribers=q["subs"], channels=q["s3_channels"], rate=q["s3_rate"],
              duration=q["dur"], **shape)
    r = fresh(target, lambda s: load(s, label, **kw))
    r["publish_mode"] = mode
    return [r]


def s3(target, q):
    """Like with like: one message per publish request, 16 publisher connections, every target."""
    return s3_run(target, q, "S3", "single", S3_SINGLE)


def s3b(target, q):
    """ringcast's batched publishing: 10 messages per request on 4 connections."""
    if target not in BATCHING:
        print(f"  {target:17} S3b          skipped: its publish API takes one message per request",
              file=sys.stderr)
        return []
    return s3_run(target, q, "S3b", "batch10", S3_BATCH)


def s4(target, q):
    return [fresh(target, lambda s: load(s, f"S4@{n}", mode="idle", subscribers=n))
            for n in q["s4_counts"]]


def s5(target, q):
    if target != "ringcast":
        return []  # resume by seq is ringcast's protocol; the peers have no equivalent here
    return [fresh(target, lambda s: load(s, "S5", mode="storm", subscribers=q["subs"],
                                         channels=100, rate=1000, batch=10,
                                         duration=q["dur"] / 2, storm_at=3))]


def s6(target, q):
    """Jitter: every client is cut at random every ~2 s and resumes by seq while publishing goes on."""
    if target != "ringcast":
        return []
    return [fresh(target, lambda s: load(s, "S6", subscribers=q["subs"], channels=100, rate=1000,
                                         batch=10, duration=q["dur"] / 2, jitter_secs=2))]


SCENARIOS = {"S1": s1, "S2": s2, "S3": s3, "S3b": s3b, "S4": s4, "S5": s5, "S6": s6}


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    commit_file = os.path.join(BIN_DIR, "COMMIT")
    if os.path.exists(commit_file):
        commit = open(commit_file).read().strip()
    else:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "server_bin_dir": BIN_DIR, "server_commit": commit, "load_bin": LOAD_BIN}


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets = [t for t in ALL_TARGETS if any(r["target"] == t for r in results)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    # S1 latency percentiles
    ax = axes[0]
    pcts = [("latency_p50_ms", "P50"), ("latency_p95_ms", "P95"), ("latency_p99_ms", "P99")]
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        r = next((r for r in results if r["target"] == t and r["label"] == "S1"), None)
        if r:
            ax.bar([j + i * width for j in range(len(pcts))], [r[k] for k, _ in pcts], width, label=t)
    ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(pcts))], [n for _, n in pcts])
    ax.set_ylabel("ms")
    ax.set_title("S1: 10k subscribers, 10 msg/s — latency")
    ax.legend()
    # S3: the seeds' load (10k connections over 1000 channels, 10k msg/s asked)
    ax = axes[1]
    held, p99 = [], []
    for t in targets:
        r = next((r for r in results if r["target"] == t and r["label"] == "S3"), None)
        held.append(r["publish_rate"] / 1000 if r else 0)
        p99.append(r["latency_p99_ms"] if r else 0)
    bars = ax.bar(targets, held, color=["C%d" % i for i in range(len(targets))])
    for b, v in zip(bars, p99):
        ax.annotate(f"P99 {v:.1f} ms", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(10, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("thousand messages/s held (asked: 10)")
    ax.set_title("S3: 10k subscribers, 1000 channels, 10k msg/s")
    # S4 RSS per idle connection
    ax = axes[2]
    for i, t in enumerate(targets):
        rs = sorted((r for r in results if r["target"] == t and r["label"].startswith("S4")),
                    key=lambda r: r["connected"])
        if rs:
            ax.plot([r["connected"] for r in rs], [r["server_rss_bytes_per_connection"] / 1024 for r in rs],
                    marker="o", label=t)
    ax.set_xlabel("idle connections")
    ax.set_ylabel("server RSS KiB / connection")
    ax.set_title("S4: memory per idle connection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(data):
    """Tables for docs/benchmarks.md, ratios against the floor where it ran."""
    res = data["results"]
    out = []
    def find(t, label):
        return next((r for r in res if r["target"] == t and r["label"] == label), None)
    targets = [t for t in ALL_TARGETS if any(r["target"] == t for r in res)]
    floor1 = find("floor", "S1")
    out.append("| S1 | P50 ms | P95 ms | P99 ms | P99.9 ms | server CPU µs/delivery | × floor CPU | lost | generator CPU % |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        r = find(t, "S1")
        if not r:
            continue
        ratio = r["server_cpu_us_per_delivery"] / floor1["server_cpu_us_per_delivery"] if floor1 and floor1["server_cpu_us_per_delivery"] else float("nan")
        out.append(f"| {t} | {r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} | {r['latency_p99_ms']:.2f} | {r['latency_p999_ms']:.2f} | {r['server_cpu_us_per_delivery']:.2f} | {ratio:.2f} | {r['lost']} | {r['generator_cpu_percent']:.0f} |")
    out.append("")
    if any(r["label"].startswith("S2@") for r in res):
        out.append("| S2 | highest passing rate msg/s | deliveries/s | P99 ms there | first failing rate | why it failed |")
        out.append("|---|---|---|---|---|---|")
    for t in targets:
        runs = [r for r in res if r["target"] == t and r["label"].startswith("S2@")]
        if not runs:
            continue
        ok = [r for r in runs if r.get("s2_pass")]
        best = max(ok, key=lambda r: r["rate_target"]) if ok else None
        bad = next((r for r in runs if not r.get("s2_pass")), None)
        why = ""
        if bad:
            reasons = []
            if bad["latency_p99_ms"] >= 100: reasons.append(f"P99 {bad['latency_p99_ms']:.0f} ms")
            if bad["lost"]: reasons.append(f"lost {bad['lost']}")
            if bad["publish_rate"] < 0.95 * bad["rate_target"]: reasons.append(f"publisher held {bad['publish_rate']:.0f}/s")
            if bad["failed"]: reasons.append(f"{bad['failed']} connects failed")
            why = ", ".join(reasons)
        out.append(f"| {t} | {best['rate_target']:.0f} | {best['deliveries_per_sec']:.0f} | {best['latency_p99_ms']:.1f} | "
                   f"{bad['rate_target'] if bad else '—'} | {why or 'none failed'} |" if best else f"| {t} | — | — | — | {bad['rate_target'] if bad else '—'} | {why} |")
    if any(r["label"].startswith("S2@") for r in res):
        out.append("")
    for label in ("S3", "S3b"):
        rows = [(t, find(t, label)) for t in targets if find(t, label)]
        if not rows:
            continue
        out.append(f"| {label} | publishing | published msg/s | deliveries/s | P50 ms | P99 ms | lost | dup | server CPU µs/delivery | publish answer P50 ms |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for t, r in rows:
            out.append(f"| {t} | {publishing(r)} | {r['publish_rate']:.0f} | {r['deliveries_per_sec']:.0f} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | {r['lost']} | {r['duplicates']} | {r['server_cpu_us_per_delivery']:.2f} | {r['publish_answer_p50_ms']:.2f} |")
        out.append("")
    out.append("| S4 | connections | server RSS KiB / conn | kernel TCP memory B / socket |")
    out.append("|---|---|---|---|")
    for t in targets:
        for r in sorted((r for r in res if r["target"] == t and r["label"].startswith("S4")), key=lambda r: r["connected"]):
            out.append(f"| {t} | {r['connected']} | {r['server_rss_bytes_per_connection']/1024:.2f} | {r['tcp_mem_bytes_per_socket']:.0f} |")
    out.append("")
    r = find("ringcast", "S5")
    if r:
        out.append("| S5 | clients | recovered | not recovered | time to all recovered s | lost | dup |")
        out.append("|---|---|---|---|---|---|---|")
        out.append(f"| ringcast | {r['connected']} | {r['storm_recovered']} | {r['storm_not_recovered']} | {r['storm_recovery_secs']:.2f} | {r['lost']} | {r['duplicates']} |")
    r = find("ringcast", "S6")
    if r:
        out.append("")
        out.append("| S6 jitter | clients | cuts | published | delivered / expected | lost | dup | gaps |")
        out.append("|---|---|---|---|---|---|---|---|")
        out.append(f"| ringcast | {r['connected']} | {r['jitter_cuts']} | {r['published']} | {r['delivered']} / {r['expected']} | {r['lost']} | {r['duplicates']} | {r['gaps']} |")
    sys_rows = [r for r in res if r.get("syscalls") or r.get("syscalls_error")]
    if sys_rows:
        names = ["sendto", "write", "writev", "io_uring_enter", "epoll_wait", "recvfrom", "read", "futex"]
        out.append("")
        out.append("Syscalls per delivery, counted in the server over a window of the publishing "
                   "(perf stat; write is mostly eventfd wake-ups; io_uring SQEs are submissions, "
                   "not syscalls):")
        out.append("")
        out.append("| target | run | tool | window s | deliveries | all | "
                   + " | ".join(names) + " | other | io_uring SQEs | of which send |")
        out.append("|---" * (len(names) + 9) + "|")
        for r in sys_rows:
            x = r.get("syscalls")
            run = f"{r['label']} {publishing(r)}" if r["label"].startswith("S3") else r["label"]
            if not x:
                out.append(f"| {r['target']} | {run} | failed: {r['syscalls_error']} |" + " |" * (len(names) + 7))
                continue
            d = x["deliveries"] or 1
            per = lambda n: f"{n / d:.3f}"
            other = x["total"] - sum(x["by_name"].get(n, 0) for n in names)
            sqes = x.get("io_uring_sqes")
            send = x.get("io_uring_sqes_by_op", {}).get("send", 0) if sqes is not None else None
            out.append(f"| {r['target']} | {run} | {x['tool']} | {x['window_secs']:.1f} | {x['deliveries']} | {per(x['total'])} | "
                       + " | ".join(per(x["by_name"].get(n, 0)) for n in names)
                       + f" | {per(other)} | {per(sqes) if sqes is not None else '—'} | {per(send) if send is not None else '—'} |")
    errors = data.get("errors", [])
    if errors:
        out.append("")
        out.append("Runs that did not complete:")
        out.append("")
        for e in errors:
            out.append(f"- {e['target']} {e['scenario']}: {e['error']}")
    return "\n".join(out)


def publishing(r):
    """How a run published: "single" (1 message per request) or "batchN", with connections."""
    mode = r.get("publish_mode")
    batch = r.get("batch")
    if batch is None:  # reports from before the generator wrote it: read the command
        cmd = r.get("command", "").split()
        batch = int(cmd[cmd.index("--batch") + 1]) if "--batch" in cmd else 1
    mode = mode or ("single" if batch == 1 else f"batch{batch}")
    pubs = r.get("publishers")
    if pubs is None:
        cmd = r.get("command", "").split()
        pubs = int(cmd[cmd.index("--publishers") + 1]) if "--publishers" in cmd else 1
    return f"{mode}, {pubs} conn"


def main():
    global BIN_DIR, LOAD_BIN, SYSCALLS
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="floor,ringcast,nchan,socketio")
    ap.add_argument("--scenarios", default="S1,S2,S3,S3b,S4,S5,S6")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-results.json"))
    ap.add_argument("--chart", default=None, help="PNG path for the chart")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--markdown", metavar="JSON", help="print the tables of an earlier run and exit")
    ap.add_argument("--chart-from", metavar="JSON", help="draw --chart from an earlier run and exit")
    ap.add_argument("--bin-dir", metavar="DIR",
                    help="take ringcast and ringcast-floor from DIR (default target/release, or "
                         "$CARGO_TARGET_DIR/release); "
                         "only ringcast-load is built then")
    ap.add_argument("--load-bin", metavar="PATH", default=LOAD_BIN,
                    help="the load generator (default target/release/ringcast-load, or under "
                         "$CARGO_TARGET_DIR)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the server's syscalls over a window of each publishing run "
                         "(perf stat, else strace) and report them per delivery")
    ap.add_argument("--no-install", action="store_true",
                    help="skip a peer whose packages are missing instead of installing them")
    a = ap.parse_args()
    BIN_DIR = os.path.abspath(a.bin_dir) if a.bin_dir else REL
    LOAD_BIN = os.path.abspath(a.load_bin)
    SYSCALLS = a.syscalls
    if a.chart_from:
        chart(json.load(open(a.chart_from))["results"], a.chart)
        return
    if a.markdown:
        print(markdown(json.load(open(a.markdown))))
        return
    q = dict(subs=10000, dur=20, s2_dur=5, s2_rates=[10, 20, 40, 60, 80, 100, 140, 200, 280, 400],
             s3_channels=1000, s3_rate=10000, s4_counts=[5000, 10000, 19000])
    if a.quick:
        q = dict(subs=1000, dur=3, s2_dur=2, s2_rates=[10, 40], s3_channels=100, s3_rate=1000,
                 s4_counts=[1000])
    targets, scenarios = a.targets.split(","), a.scenarios.split(",")
    for name in scenarios:
        if name not in SCENARIOS:
            ap.error(f"unknown scenario {name} (known: {', '.join(SCENARIOS)})")
    if not a.no_build:
        bins = ["--bin", "ringcast-load"] if a.bin_dir else ["--bins"]
        subprocess.run(["cargo", "build", "--release"] + bins, cwd=ROOT, check=True)
    results, errors, skipped = [], [], set()
    for target in targets:
        missing = peer_missing(target)
        if missing and a.no_install:
            print(f"{target}: skipped, {missing} not installed (--no-install)", file=sys.stderr)
            errors.append({"target": target, "scenario": ",".join(scenarios),
                           "error": f"skipped: {missing} not installed"})
            skipped.add(target)
        elif missing:
            print(f"{target}: its start.sh installs {missing} first", file=sys.stderr)
    for target in targets:
        if target in skipped:
            continue
        for name in scenarios:
            print(f"{target} {name}", file=sys.stderr, flush=True)
            try:
                results += SCENARIOS[name](target, q)
            except Exception as e:  # one failed run does not lose the others
                print(f"{target} {name} failed: {e}", file=sys.stderr)
                errors.append({"target": target, "scenario": name, "error": str(e)})
            with open(a.out, "w") as f:
                json.dump({"machine": machine(), "results": results, "errors": errors}, f,
                          indent=1)
    if a.chart:
        chart(results, a.chart)
    print(json.dumps({"machine": machine(), "results": results, "errors": errors}))


if __name__ == "__main__":
    main()
