"""A Python MessagePack client (`msgpack` + `websockets`) next to a JSON one, same run.

Usage: msgpack_check.py HOST:PORT TOKEN API_KEY
"""
import asyncio
import json
import sys
import urllib.request

import msgpack
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
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def main():
    j = await websockets.connect(f"ws://{ADDR}/ws?channels=project:py&token={TOKEN}")
    m = await websockets.connect(f"ws://{ADDR}/ws?channels=project:py&token={TOKEN}&encoding=messagepack")
    for _ in range(2):
        json.loads(await asyncio.wait_for(j.recv(), 10))
    welcome = msgpack.unpackb(await asyncio.wait_for(m.recv(), 10))
    check(welcome["type"] == "welcome" and welcome["encoding"] == "messagepack", welcome)
    sub = msgpack.unpackb(await asyncio.wait_for(m.recv(), 10))
    check(sub["type"] == "subscribed", sub)
    publish([{"channel": "project:py", "event": "agent:status",
              "data": {"agent_id": "a1", "old_status": "idle", "new_status": "working", "n": i}}
             for i in range(20)])
    for i in range(20):
        a = json.loads(await asyncio.wait_for(j.recv(), 10))
        raw = await asyncio.wait_for(m.recv(), 10)
        check(isinstance(raw, bytes), "MessagePack comes in binary frames")
        b = msgpack.unpackb(raw)
        check(a == b, (a, b))
        check(b["data"]["n"] == i, i, b)
    await j.close()
    await m.close()
    print("python msgpack client: all checks passed")


asyncio.run(main())
