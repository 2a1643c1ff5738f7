//! Socket.IO in a real browser: headless Chromium runs socket.io-client v4's own browser bundle
//! (`dist/socket.io.min.js`, from the npm package tests/socketio.rs installs) against
//! `/socket.io/`. The page is the server's own `/healthz` (same origin); the bundle is
//! evaluated into it over the DevTools protocol (no network beyond the server), and each
//! scenario runs there as one promise that throws `FAILED: ...` on the first check that fails
//! and waits for every event with a bounded timeout. Needs `chromium` and `npm` (tests/run.sh).
//!
//! Unlike Node's client (which compresses only messages over 1 KiB), a browser compresses every
//! message once permessage-deflate is accepted, so the upgrade from polling is where this test
//! sees what tests/socketio.rs cannot.

mod support;

use serde_json::{json, Value};
use support::browser::Browser;
use support::*;

/// Helpers every scenario starts with (`TOKEN`, `BAD_TOKEN` and `KEY`, the API key, are
/// defined before them).
const PRELUDE: &str = r#"
  const WAIT_MS = 5000;
  const j = JSON.stringify;
  // What the sockets went through, told with any failure.
  const trail = [];
  const note = (what) => trail.push(Math.round(performance.now()) + " ms " + what);
  const failure = (what) => new Error("FAILED: " + what + "\n  trail: " + j(trail));
  const check = (ok, what) => { if (!ok) throw failure(what); };
  // Key order aside, the same JSON value.
  const canon = (v) => Array.isArray(v) ? v.map(canon)
    : (v && typeof v === "object") ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])]))
    : v;
  const same = (a, b) => j(canon(a)) === j(canon(b));
  const within = (promise, what) => {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(failure("timed out after " + WAIT_MS + " ms waiting for " + what)), WAIT_MS);
    });
    return Promise.race([promise, late]).finally(() => clearTimeout(timer));
  };
  // The next `event` of a socket or an engine: its arguments. Marked handled at once, so that
  // a timeout before it is awaited is not reported as unhandled; awaiting it still throws.
  const once = (emitter, event) => {
    const p = within(new Promise((resolve) => emitter.once(event, (...args) => resolve(args))), event);
    p.catch(() => {});
    return p;
  };
  const publish = async (channel, event, data) => {
    const res = await fetch("/api/v1/publish", {
      method: "POST",
      headers: {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"},
      body: j({channel, event, data}),
    });
    const body = await res.json();
    check(res.status === 200 && typeof body.seq === "number",
      "publish of " + event + " answered " + res.status + " " + j(body));
    return body.seq;
  };
  const describe = (d) => d === undefined ? "" : " " + (d instanceof Error ? d.message : (() => {
    try { return j(d); } catch (_) { return String(d); } })());
  const connect = (token, extra = {}) => {
    const socket = io(location.origin, {auth: {token}, reconnection: false, forceNew: true, ...extra});
    const engine = socket.io.engine;
    socket.on("connect", () => note("connect over " + engine.transport.name));
    socket.on("connect_error", (e) => note("connect_error: " + e.message));
    socket.on("disconnect", (reason, d) => note("disconnect: " + reason + describe(d)));
    engine.on("upgrade", (t) => note("upgrade to " + t.name));
    engine.on("upgradeError", (e) => note("upgradeError:" + describe(e)));
    engine.on("close", (reason, d) => note("engine close: " + reason + describe(d)));
    return socket;
  };
  const connected = (socket) => within(new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", (e) => reject(failure("connect_error: " + e.message)));
  }), "connect");
  const ack = (socket, event, arg) => within(socket.emitWithAck(event, arg), "the ack of " + event)
    .catch((e) => { throw e.message.startsWith("FAILED") ? e : failure("the ack of " + event + ": " + e.message); });
  check(typeof io === "function", "the bundle defines the global io: " + typeof io);
"#;

/// Default transports (polling, then the upgrade): a bad token, then the whole round.
const DEFAULT_TRANSPORTS: &str = r#"
  // A token with a bad signature: connect_error naming the token, and no connection.
  const bad = connect(BAD_TOKEN);
  const [err] = await once(bad, "connect_error");
  check(/token/i.test(err.message), "the connect_error message names the token: " + err.message);
  check(!bad.connected, "a bad token does not connect");
  bad.close();

  const early = {taskId: "t1", title: "published before the join"};
  const before = await publish("task:t1", "task:created", early);

  const socket = connect(TOKEN);
  const engine = socket.io.engine;
  check(engine, "io() opened an engine at once");
  const first = engine.transport.name;
  const upgrade = once(engine, "upgrade");
  await connected(socket);
  check(socket.connected && typeof socket.id === "string" && socket.id.length > 0,
    "connected with a socket id: " + socket.id);
  check(first === "polling", "the default transports start with polling: " + first);
  const [upgradedTo] = await upgrade;
  check(upgradedTo.name === "websocket" && engine.transport.name === "websocket",
    "upgraded to websocket: the upgrade event named " + upgradedTo.name + ", the engine uses " + engine.transport.name);

  // task:join: the ack, and task:state holding what was published before it.
  const statePromise = once(socket, "task:state");
  const joined = await ack(socket, "task:join", {taskId: "t1"});
  check(joined.ok === true && joined.type === "subscribed" && joined.channel === "task:t1" && joined.seq === before,
    "task:join ack is ok, subscribed to task:t1 at seq " + before + ": " + j(joined));
  const [state] = await statePromise;
  check(state.taskId === "t1" && state.channel === "task:t1" && state.seq === before,
    "task:state is task t1's as of seq " + before + ": " + j(state));
  check(Array.isArray(state.events) && state.events.some((e) => e.event === "task:created" && same(e.data, early)),
    "task:state holds the event published before the join, with its data: " + j(state.events));

  // A live event after the join: the publisher's data, meta beside it.
  const live = once(socket, "task:progress");
  const data = {taskId: "t1", percent: 42, note: "ünïcødé ✓", nested: {list: [1, "two", null]}};
  const seq = await publish("task:t1", "task:progress", data);
  const [got, meta] = await live;
  check(same(got, data), "the handler gets the publisher's data: " + j(got));
  check(meta && meta.channel === "task:t1" && meta.seq === seq && seq === before + 1,
    "meta names the channel and seq " + seq + ": " + j(meta));
  check(typeof meta.ts === "number" && meta.ts > 1.7e12, "meta has a ts in ms: " + j(meta));

  // A channel the token does not allow: an error ack naming it.
  const denied = await ack(socket, "subscribe", {channel: "project:p2"});
  check(denied.ok === false && denied.code === "forbidden" && denied.channel === "project:p2",
    "subscribe to project:p2 gets a forbidden ack: " + j(denied));

  check(socket.connected && engine.transport.name === "websocket",
    "still connected over websocket at the end: " + socket.connected + " " + engine.transport.name);
  socket.close();
  return {first, upgradedTo: upgradedTo.name, joined, stateSeq: state.seq, seq, meta, denied};
"#;

/// `transports: ["polling"]`: long-polling only, never upgraded, and events still arrive.
const POLLING_ONLY: &str = r#"
  const socket = connect(TOKEN, {transports: ["polling"]});
  const engine = socket.io.engine;
  let upgraded = null;
  engine.on("upgrade", (t) => { upgraded = t.name; });
  await connected(socket);
  check(engine.transport.name === "polling", "connected over polling: " + engine.transport.name);

  const joined = await ack(socket, "task:join", {taskId: "t2"});
  check(joined.ok === true && joined.channel === "task:t2", "task:join ack over polling: " + j(joined));
  const live = once(socket, "task:progress");
  const data = {taskId: "t2", percent: 7};
  const seq = await publish("task:t2", "task:progress", data);
  const [got, meta] = await live;
  check(same(got, data), "the handler gets the publisher's data over polling: " + j(got));
  check(meta && meta.channel === "task:t2" && meta.seq === seq, "meta names the channel and seq " + seq + ": " + j(meta));
  check(upgraded === null && engine.transport.name === "polling",
    "never upgraded: " + upgraded + " " + engine.transport.name);
  socket.close();
  return {transport: engine.transport.name, joined, seq, meta};
"#;

/// A server, and Chromium on its `/healthz` with the socket.io-client bundle loaded.
async fn page_with_socket_io() -> (Server, Browser) {
    let bundle_path = node_modules().join("socket.io-client/dist/socket.io.min.js");
    let bundle = std::fs::read_to_string(&bundle_path)
        .unwrap_or_else(|e| panic!("{}: {e}", bundle_path.display()));
    let server = Server::start();
    let mut browser = Browser::launch().await;
    browser
        .goto(&format!("http://{}/healthz", server.addr))
        .await;
    browser
        .try_eval(&bundle)
        .await
        .unwrap_or_else(|e| panic!("the socket.io-client bundle did not load: {e}"));
    (server, browser)
}

/// Runs `scenario` (after the prelude) in the page: what it returned, or a panic with the
/// check that failed.
async fn run(browser: &mut Browser, scenario: &str) -> Value {
    let good = token(json!({"sub": "b1", "projects": ["p1"], "channels": ["task:*", "dashboard"]}));
    let bad = ringcast::edge::jwt::sign_hs256(
        b"not-the-server-secret-0123456789",
        &json!({"sub": "b1", "projects": ["p1"], "exp": now_secs() + 3600}),
    );
    let script = format!(
        "(async () => {{ const TOKEN = {}, BAD_TOKEN = {}, KEY = {};{PRELUDE}{scenario}}})()",
        json!(good),
        json!(bad),
        json!(API_KEY),
    );
    tokio::time::timeout(WAIT * 3, browser.try_eval(&script))
        .await
        .expect("the scenario settles (every wait in it is bounded)")
        .unwrap_or_else(|e| panic!("in Chromium: {e}"))
}

#[tokio::test]
async fn chromium_socket_io_client_upgrades_to_websocket_joins_a_task_and_gets_its_events() {
    let (_server, mut browser) = page_with_socket_io().await;
    let v = run(&mut browser, DEFAULT_TRANSPORTS).await;
    // The page checked all of it; these say what it saw.
    assert_eq!(v["first"], "polling", "{v}");
    assert_eq!(v["upgradedTo"], "websocket", "{v}");
    assert_eq!(v["joined"]["ok"], true, "{v}");
    assert_eq!(v["meta"]["seq"], v["seq"], "{v}");
    assert_eq!(v["denied"]["code"], "forbidden", "{v}");
}

#[tokio::test]
async fn chromium_socket_io_client_over_polling_only_gets_published_events() {
    let (_server, mut browser) = page_with_socket_io().await;
    let v = run(&mut browser, POLLING_ONLY).await;
    assert_eq!(v["transport"], "polling", "{v}");
    assert_eq!(v["meta"]["seq"], v["seq"], "{v}");
}
