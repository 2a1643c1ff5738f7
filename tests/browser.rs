//! End to end in a real browser: headless Chromium's `EventSource` against `/events`, driven
//! over the DevTools protocol. The page is the server's own `/healthz` (same origin), and the
//! scenario runs in it: receive, get disconnected, resume via `Last-Event-ID` without loss.
//! Needs `chromium` (Debian's package; tests/run.sh installs it); the driver is
//! tests/support/browser.rs.

mod support;

use serde_json::{json, Value};
use support::browser::Browser;
use support::*;

/// The scenario, in the page. Returns what it saw as a JSON string.
const SCENARIO: &str = r#"
(async () => {
  const headers = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"};
  const publish = (from, to) => fetch("/api/v1/publish", {method: "POST", headers,
    body: JSON.stringify(Array.from({length: to - from + 1}, (_, i) =>
      ({channel: "task:b1", event: "output", data: {n: from + i}})))});
  const queue = []; let wake = null;
  const put = (m) => { queue.push(m); if (wake) { wake(); wake = null; } };
  const es = new EventSource("/events?channels=task:b1&token=" + TOKEN);
  es.onmessage = (e) => put({data: JSON.parse(e.data), id: e.lastEventId});
  es.onerror = () => put({error: es.readyState});
  const take = async () => { while (!queue.length) await new Promise(r => wake = r); return queue.shift(); };
  const until = async (pred) => { for (;;) { const m = await take(); if (pred(m)) return m; } };
  const seen = [], ids = [];
  let welcomes = 0;
  const event = (m) => {
    if (m.data && m.data.type === "welcome") welcomes++;
    if (m.data && m.data.event) { seen.push(m.data.data.n); ids.push(m.id); return true; }
    return false;
  };
  await until(m => { event(m); return m.data && m.data.type === "subscribed"; });
  await publish(1, 5);
  while (seen.length < 5) event(await take());
  await fetch("/api/v1/admin/disconnect", {method: "POST", headers,
    body: JSON.stringify({user_id: "browser", reason: "test"})});
  const closed = await until(m => m.data && m.data.type === "closed");
  // Published while the browser is away (it reconnects after the stream's retry: 1000).
  await publish(6, 10);
  const error = await until(m => m.error !== undefined);
  let replayed = null;
  while (!replayed) {
    const m = await take();
    if (!event(m) && m.data && m.data.type === "replayed") replayed = m.data;
  }
  await publish(11, 11);
  while (seen.length < 11) event(await take());
  es.close();
  return JSON.stringify({seen, ids, closed: closed.data, error: error.error, replayed, welcomes});
})()
"#;

#[tokio::test]
async fn chromium_event_source_resumes_with_last_event_id_without_loss() {
    let server = Server::start();
    let user = token(json!({"sub": "browser", "channels": ["task:*"]}));
    let mut browser = Browser::launch().await;
    browser
        .goto(&format!("http://{}/healthz", server.addr))
        .await;
    let script = SCENARIO
        .replace("TOKEN", &format!("{user:?}"))
        .replace("KEY", &format!("{API_KEY:?}"));
    let out = tokio::time::timeout(WAIT * 3, browser.eval_raw(&script))
        .await
        .expect("the scenario finishes");
    let v: Value = serde_json::from_str(out.as_str().expect("a JSON string")).unwrap();
    assert_eq!(v["seen"], json!((1..=11).collect::<Vec<_>>()), "{v}");
    assert_eq!(
        v["closed"],
        json!({"type": "closed", "code": 4003, "reason": "test"})
    );
    assert_eq!(v["error"], 0, "EventSource was reconnecting (CONNECTING)");
    assert_eq!(
        v["replayed"],
        json!({"type": "replayed", "channel": "task:b1", "recovered": true, "count": 5}),
        "the reconnect carried Last-Event-ID and got exactly what it missed"
    );
    assert_eq!(v["welcomes"], 2, "one stream, then one resumed stream");
    let ids = v["ids"].as_array().unwrap();
    assert!(
        ids.last().unwrap().as_str().unwrap().ends_with(":11"),
        "{ids:?}"
    );
}
