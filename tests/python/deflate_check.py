"""Python `websockets` with permessage-deflate (its default) against a running ringcast.

Usage: deflate_check.py HOST:PORT TOKEN API_KEY
Checks that compression is negotiated, that large and small events arrive intact and equal to
what a client without compression gets, and that the client's own (compressed) messages work.
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


def response_headers(ws):
    response = getattr(ws, "response", None)
    return response.headers if response is not None else ws.response_headers


async def main():
    url = f"ws://{ADDR}/ws?channels=project:py&token={TOKEN}"
    z = await websockets.connect(url, compression="deflate", max_size=2**24)
    plain = await websockets.connect(url, compression=None, max_size=2**24)
    ext = response_headers(z).get("Sec-WebSocket-Extensions", "")
    check(ext.startswith("permessage-deflate"), ext)
    check("server_no_context_takeover" in ext, ext)
    plain_ext = response_headers(plain).get("Sec-WebSocket-Extensions")
    check(plain_ext is None, plain_ext)
    for ws in (z, plain):
        welcome = await recv_json(ws)
        check(welcome["type"] == "welcome", welcome)
        sub = await recv_json(ws)
        check(sub["type"] == "subscribed", sub)

    # The client compresses what it sends: a filter message the server must inflate.
    await z.send(json.dumps({"type": "filter", "event_types": ["log"]}))
    filtered = await recv_json(z)
    check(filtered["type"] == "filtered" and filtered["event_types"] == ["log"], filtered)

    big_line = "\x1b[32mPASSED\x1b[0m tests/test_ünïcødé.py::test_case ✓ " * 200
    bodies = []
    for i in range(20):
        line = big_line if i % 2 == 0 else f"small {i}"
        bodies.append({"channel": "project:py", "event": "log", "data": {"i": i, "line": line}})
    publish(bodies)
    for i in range(20):
        a, b = await recv_json(z), await recv_json(plain)
        check(a == b, (a, b))
        check(a["data"]["i"] == i and a["event"] == "log", a)
        check(a["data"]["line"] == bodies[i]["data"]["line"], i, a)
    await z.close()
    await plain.close()
    print("all checks passed")


asyncio.run(main())
