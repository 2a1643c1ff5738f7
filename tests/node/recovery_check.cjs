// Socket.IO connection state recovery against ringcast (run by tests/socketio.rs).
// Env: URL, TOKEN (channels task:* and dashboard), API_KEY, TRANSPORTS, REPLAY (the server's
// replay ring size). The transport is cut (its TCP socket destroyed, no close) while events
// are published on two channels; the client reconnects by itself and must get every missed
// event once, in order, with socket.recovered === true. Then more is missed than the ring
// holds: recovered must be false.
"use strict";
const { io } = require("socket.io-client");
const { check, checkSame, within, until, publishTo, run } = require("./common.cjs");

const { URL, TOKEN, API_KEY } = process.env;
const transports = (process.env.TRANSPORTS || "websocket").split(",");
const REPLAY = Number(process.env.REPLAY);

function publish(channel, n) {
  return publishTo(URL, API_KEY, { channel, event: "tick", data: { channel, n } });
}

function cut(socket) {
  const transport = socket.io.engine.transport;
  check(transport.name === "websocket", "cutting a websocket transport, not " + transport.name);
  transport.ws._socket.destroy(); // TCP gone, no close frame: the server sees the socket end
}

async function main() {
  const socket = io(URL, {
    auth: { token: TOKEN },
    transports,
    reconnectionDelay: 100,
    reconnectionDelayMax: 200,
  });
  const got = { "task:r1": [], dashboard: [] };
  socket.on("tick", (data, meta) => got[meta.channel].push(meta.seq));
  const connects = [];
  socket.on("connect", () => connects.push(socket.recovered));
  await until(() => connects.length === 1, "first connect");
  check(!connects[0], "a first connection is not a recovery");
  check((await socket.emitWithAck("task:join", { taskId: "r1" })).ok, "task:join");
  check((await socket.emitWithAck("dashboard:join", {})).ok, "dashboard:join");
  if (transports.length > 1 && socket.io.engine.transport.name !== "websocket") {
    await within(new Promise((r) => socket.io.engine.once("upgrade", r)), "upgrade");
  }

  // Round 1: cut while publishing; fewer missed than the ring holds.
  const published = { "task:r1": [], dashboard: [] };
  for (let i = 0; i < 40; i++) {
    const channel = i % 2 ? "dashboard" : "task:r1";
    published[channel].push(await publish(channel, i));
    if (i === 9) cut(socket);
  }
  await until(() => connects.length === 2, "reconnect");
  check(connects[1] === true, "socket.recovered is true after the cut");
  await until(() => got["task:r1"].length >= 20 && got.dashboard.length >= 20, "every missed event");
  // A marker after everything: nothing more is on its way.
  const marker = await publish("dashboard", -1);
  published.dashboard.push(marker);
  await until(() => got.dashboard.includes(marker), "the marker");
  checkSame(got, published);

  // Round 2: more missed than the replay ring holds: not recovered.
  const disconnected = new Promise((r) => socket.once("disconnect", r));
  cut(socket);
  await within(disconnected, "the cut noticed");
  // The client reconnects within a few hundred ms; publish faster than that, all at once.
  await Promise.all(Array.from({ length: REPLAY + 10 }, (_, i) => publish("task:r1", 1000 + i)));
  await until(() => connects.length === 3, "second reconnect");
  check(!connects[2], "socket.recovered is false when the ring lost events");

  socket.close();
  console.log("recovery checks passed over " + transports.join("+"));
}

run(main);
