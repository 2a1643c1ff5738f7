"""A real Python `websockets` client against a running ringcast.

Usage: client_check.py HOST:PORT TOKEN API_KEY
Exits non-zero with a message on the first broken promise.
"""
import asyncio
import json
import sys
import urllib.request

import websockets


def check(ok, *what):
    """An explicit check: unlike `assert`, it holds under `python -O` / PYTHONOPTIMIZE."""
    if not ok:
        raise SystemExit("check failed: " + " ".join(repr(w) for w in what))


ADDR, TOKEN, API_KEY = sys.argv[1], sys.argv[2], sys.argv[3]
N = 100


def publish(body):
    req = urllib.request.Request(
        f"http://{ADDR}/api/v1/publish",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        check(resp.status == 200, resp.status)
        return json.loads(resp.read())


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def main():
    # One client passes the token in the query, one as a browser would: in the subprotocol offer.
    q = await websockets.connect(f"ws://{ADDR}/ws?channels=project:py&token={TOKEN}")
    p = await websockets.connect(
        f"ws://{ADDR}/ws/projects/py", subprotocols=["ringcast", f"bearer.{TOKEN}"]
    )
    check(p.subprotocol == "ringcast", p.subprotocol)
    for ws in (q, p):
        welcome = await recv_json(ws)
        check(welcome["type"] == "welcome", welcome)
        check(welcome["channels"] == ["project:py"], welcome)
        sub = await recv_json(ws)
        check(sub == {"type": "subscribed", "channel": "project:py", "seq": 0}, sub)

    batch = [
        {"channel": "project:py", "event": "task:progress", "data": {"i": i, "text": "ünïcødé ✓"}}
        for i in range(1, N + 1)
    ]
    seqs = [r["seq"] for r in publish(batch)]
    check(seqs == list(range(1, N + 1)), seqs)

    for ws in (q, p):
        for i in range(1, N + 1):
            ev = await recv_json(ws)
            check(set(ev) == {"channel", "seq", "event", "ts", "data"}, ev)
            check(ev["seq"] == i and ev["data"]["i"] == i, (i, ev))
            check(ev["data"]["text"] == "ünïcødé ✓", ev)
            check(ev["event"] == "task:progress", ev)

    # Exactly once: nothing more arrives after the last one but the next publish.
    publish({"channel": "project:py", "event": "done", "data": None})
    for ws in (q, p):
        ev = await recv_json(ws)
        check(ev["seq"] == N + 1 and ev["event"] == "done", ev)

    # Bad input gets an error frame, the connection lives on.
    await q.send("{oops")
    err = await recv_json(q)
    check(err["type"] == "error" and err["code"] == "bad_json", err)
    await q.send(json.dumps({"type": "unsubscribe", "channels": ["project:py"]}))
    unsub = await recv_json(q)
    check(unsub["type"] == "unsubscribed", unsub)

    # A forbidden channel is refused at the handshake with 403.
    try:
        await websockets.connect(f"ws://{ADDR}/ws?channels=system&token={TOKEN}")
        raise SystemExit("check failed: system channel accepted for a non-admin")
    except websockets.exceptions.InvalidStatus as e:
        check(e.response.status_code == 403, e.response.status_code)

    await q.close()
    await p.close()
    print("python websockets client: all checks passed")


asyncio.run(main())
