// The real socket.io-client v4 against ringcast's /socket.io/ (run by tests/socketio.rs).
// Env: URL (http://127.0.0.1:port), TOKEN (projects ["p1"], channels task:* and dashboard),
// OTHER_TOKEN (projects ["p2"]), BAD_TOKEN, API_KEY, TRANSPORTS (comma list).
// Every check fails the run with a message; nothing is skipped.
"use strict";
const { io } = require("socket.io-client");
const { check, within, publishTo, run } = require("./common.cjs");

const { URL, TOKEN, OTHER_TOKEN, BAD_TOKEN, API_KEY } = process.env;
const transports = (process.env.TRANSPORTS || "websocket").split(",");

const publish = (body) => publishTo(URL, API_KEY, body);

function once(socket, event) {
  return within(new Promise((resolve) => socket.once(event, (...args) => resolve(args))), event);
}

function connect(token, extra = {}) {
  return io(URL, { auth: { token }, transports, reconnection: false, forceNew: true, ...extra });
}

async function connected(socket) {
  await within(
    new Promise((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("connect_error", (e) => reject(new Error("connect_error: " + e.message)));
    }),
    "connect"
  );
}

function emitAck(socket, event, arg) {
  return within(socket.emitWithAck(event, arg), "ack of " + event);
}

async function main() {
  // A bad token: connect_error with the reason, no connection.
  const bad = connect(BAD_TOKEN);
  const [err] = await once(bad, "connect_error");
  check(/token|signature|invalid/i.test(err.message), "connect_error says why: " + err.message);
  check(!bad.connected, "a bad token does not connect");
  bad.close();

  // No token at all.
  const none = connect(undefined);
  const [err2] = await once(none, "connect_error");
  check(/missing token/i.test(err2.message), "a missing token is named: " + err2.message);
  none.close();

  // Events published before the join make the task's state: the newest per key.
  await publish({ channel: "task:t1", event: "task:created", data: { taskId: "t1", title: "a" } });
  await publish({ channel: "task:t1", event: "task:analyzing", data: { taskId: "t1", status: "analyzing" }, coalesce_key: "status" });
  const head = await publish({ channel: "task:t1", event: "task:dispatched", data: { taskId: "t1", status: "dispatched" }, coalesce_key: "status" });

  const socket = connect(TOKEN);
  await connected(socket);
  check(typeof socket.id === "string" && socket.id.length > 0, "socket.id is set");

  const statePromise = once(socket, "task:state");
  const joined = await emitAck(socket, "task:join", { taskId: "t1" });
  check(joined.ok === true && joined.channel === "task:t1", "task:join ack: " + JSON.stringify(joined));
  check(joined.seq === head, "task:join ack carries the head seq " + head + ": " + JSON.stringify(joined));
  const [state] = await statePromise;
  check(state.taskId === "t1" && state.channel === "task:t1" && state.seq === head, "task:state header: " + JSON.stringify(state));
  const names = state.events.map((e) => e.event);
  check(JSON.stringify(names) === JSON.stringify(["task:created", "task:dispatched"]), "task:state holds the newest per key: " + JSON.stringify(names));
  check(state.events[1].data.status === "dispatched", "task:state events carry their data");

  // Live events after the state: no gap, no repeat; payload as published, meta beside it.
  const live = [];
  socket.on("task:pr_opened", (data, meta) => live.push({ data, meta }));
  const s1 = await publish({ channel: "task:t1", event: "task:pr_opened", data: { taskId: "t1", prUrl: "u", prNumber: 7 } });
  await within(new Promise((r) => { const t = setInterval(() => { if (live.length) { clearInterval(t); r(); } }, 5); }), "live event");
  check(live[0].data.prNumber === 7 && live[0].data.taskId === "t1", "the handler gets the publisher's data: " + JSON.stringify(live[0]));
  check(live[0].meta.channel === "task:t1" && live[0].meta.seq === s1 && live[0].meta.seq === head + 1, "meta has channel and seq: " + JSON.stringify(live[0].meta));
  check(typeof live[0].meta.ts === "number" && live[0].meta.ts > 1.7e12, "meta has ts");

  // The dashboard.
  const dash = await emitAck(socket, "dashboard:join", {});
  check(dash.ok === true && dash.channel === "dashboard", "dashboard:join ack: " + JSON.stringify(dash));

  // A forbidden room: an error ack naming it.
  const denied = await emitAck(socket, "subscribe", { channel: "project:p2" });
  check(denied.ok === false && denied.code === "forbidden" && denied.channel === "project:p2", "forbidden ack: " + JSON.stringify(denied));
  const deniedTask = await emitAck(socket, "task:join", { taskId: "" });
  check(deniedTask.ok === false && deniedTask.code === "bad_message", "a task:join without a task id: " + JSON.stringify(deniedTask));

  // ringcast's own controls, as events with acks.
  const sub = await emitAck(socket, "subscribe", { channels: ["project:p1"] });
  check(sub.ok === true && sub.type === "subscribed" && sub.channel === "project:p1", "subscribe ack: " + JSON.stringify(sub));
  const paused = await emitAck(socket, "pause", {});
  check(paused.ok === true && paused.type === "paused", "pause ack: " + JSON.stringify(paused));
  const resumed = await emitAck(socket, "resume", {});
  check(resumed.ok === true && resumed.type === "resumed" && resumed.skipped === 0, "resume ack: " + JSON.stringify(resumed));
  const unknown = await emitAck(socket, "no-such-event", {});
  check(unknown.ok === false && unknown.code === "unknown_type", "unknown event: " + JSON.stringify(unknown));

  // Another project's events never arrive: neither on its channel nor on a shared one.
  const other = connect(OTHER_TOKEN);
  await connected(other);
  const otherSub = await emitAck(other, "subscribe", { channel: "project:p2" });
  check(otherSub.ok === true, "the other client subscribes its project");
  const seen = [];
  socket.onAny((event, data, meta) => { if (meta && meta.channel) seen.push(meta.channel + "/" + event); });
  const otherGets = once(other, "secret");
  await publish({ channel: "project:p2", event: "secret", data: { n: 1 } });
  await publish({ channel: "dashboard", event: "stat", data: { n: 2 }, project_id: "p2" });
  const [otherGot] = await otherGets;
  check(otherGot.n === 1, "the other project's client gets its event");
  const marked = once(socket, "mark");
  const mark = await publish({ channel: "dashboard", event: "mark", data: { n: 3 } });
  const [, markMeta] = await marked;
  check(markMeta.seq === mark, "the marker arrives");
  check(!seen.some((s) => s.includes("secret") || s.includes("stat")), "no event of another project: " + JSON.stringify(seen));

  // A plain WebSocket client on the same channel gets the same events, same seqs, same data.
  const WebSocket = require("ws");
  const plain = new WebSocket(URL.replace("http", "ws") + "/ws?channels=dashboard&token=" + TOKEN);
  const plainGot = [];
  plain.on("message", (m) => { const v = JSON.parse(m); if (v.event === "both") plainGot.push(v); });
  await within(new Promise((r) => plain.on("message", (m) => { if (JSON.parse(m).type === "subscribed") r(); })), "plain subscribed");
  const sioGot = [];
  socket.on("both", (data, meta) => sioGot.push({ data, meta }));
  for (let i = 0; i < 20; i++) await publish({ channel: "dashboard", event: "both", data: { i, text: "é\n\"q\"" } });
  await within(new Promise((r) => { const t = setInterval(() => { if (plainGot.length >= 20 && sioGot.length >= 20) { clearInterval(t); r(); } }, 5); }), "both clients");
  for (let i = 0; i < 20; i++) {
    check(plainGot[i].seq === sioGot[i].meta.seq && plainGot[i].channel === sioGot[i].meta.channel &&
      plainGot[i].ts === sioGot[i].meta.ts && JSON.stringify(plainGot[i].data) === JSON.stringify(sioGot[i].data),
      "the same event both ways: " + JSON.stringify(plainGot[i]) + " vs " + JSON.stringify(sioGot[i]));
  }
  plain.close();

  // resync_requested answers the task's state again.
  const again = once(socket, "task:state");
  const resync = await emitAck(socket, "resync_requested", { taskIds: ["t1"] });
  check(resync.ok === true, "resync ack");
  const [state2] = await again;
  check(state2.seq === s1 && state2.events.some((e) => e.event === "task:pr_opened"), "resync state is current: " + JSON.stringify(state2));

  // Leaving a task: no more of its events.
  const left = await emitAck(socket, "task:leave", { taskId: "t1" });
  check(left.ok === true && left.type === "unsubscribed", "task:leave ack: " + JSON.stringify(left));

  // Polling first: the session moves to a WebSocket and goes on there.
  if (transports.length > 1) {
    const engine = socket.io.engine;
    if (engine.transport.name !== "websocket") await once(engine, "upgrade");
    check(engine.transport.name === "websocket", "upgraded to websocket: " + engine.transport.name);
    const after = once(socket, "mark");
    const seq = await publish({ channel: "dashboard", event: "mark", data: { n: 4 } });
    const [data, meta] = await after;
    check(data.n === 4 && meta.seq === seq, "events flow after the upgrade");
  }
  check(socket.io.engine.transport.name === transports[transports.length - 1], "the transport in use is " + socket.io.engine.transport.name);

  socket.close();
  other.close();
  console.log("socket.io checks passed over " + transports.join("+"));
}

run(main);
