// Socket.IO recovery across a node drain in cluster mode (run by tests/socketio.rs).
// Env: URL_A, URL_B (two ringcast nodes on one Redis), A_PID, TOKEN, API_KEY.
// The client is on node A; events are published through node B all along; A is sent SIGTERM
// (drain); the client reconnects to B (as a load balancer would send it) and must recover:
// socket.recovered === true and every event exactly once, in order, on both channels.
"use strict";
const { io } = require("socket.io-client");
const { check, checkSame, until, publishTo, run } = require("./common.cjs");

const { URL_A, URL_B, A_PID, TOKEN, API_KEY } = process.env;

function publish(channel, n) {
  return publishTo(URL_B, API_KEY, { channel, event: "tick", data: { n } });
}

async function main() {
  const socket = io(URL_A, {
    auth: { token: TOKEN },
    transports: ["websocket"],
    reconnectionDelay: 100,
    reconnectionDelayMax: 200,
  });
  const got = { "task:d1": [], dashboard: [] };
  socket.on("tick", (data, meta) => got[meta.channel].push(meta.seq));
  const connects = [];
  socket.on("connect", () => connects.push({ recovered: socket.recovered, uri: socket.io.uri }));
  // The node went away: the next connection goes to the other node.
  socket.on("disconnect", () => { socket.io.uri = URL_B; });
  await until(() => connects.length === 1, "first connect");
  check((await socket.emitWithAck("task:join", { taskId: "d1" })).ok, "task:join");
  check((await socket.emitWithAck("dashboard:join", {})).ok, "dashboard:join");

  const published = { "task:d1": [], dashboard: [] };
  for (let i = 0; i < 60; i++) {
    const channel = i % 2 ? "dashboard" : "task:d1";
    published[channel].push(await publish(channel, i));
    if (i === 10) process.kill(Number(A_PID), "SIGTERM");
    if (i > 10 && connects.length < 2) await new Promise((r) => setTimeout(r, 10));
  }
  await until(() => connects.length === 2, "reconnect to the other node");
  check(connects[1].uri === URL_B, "reconnected to node B: " + connects[1].uri);
  check(connects[1].recovered === true, "socket.recovered is true on the other node");
  const marker = await publish("dashboard", -1);
  published.dashboard.push(marker);
  await until(() => got.dashboard.includes(marker), "the marker");
  checkSame(got, published);
  socket.close();
  console.log("drain recovery checks passed");
}

run(main);
