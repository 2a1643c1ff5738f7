//! End to end in a real browser: headless Chromium's `EventSource` against `/events`, driven
//! over the DevTools protocol. The page is the server's own `/healthz` (same origin), and the
//! scenario runs in it: receive, get disconnected, resume via `Last-Event-ID` without loss.
//! Needs `chromium` (Debian's package; `.ci/run` installs it).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    _profile: std::path::PathBuf,
    ws: Ws,
    session: String,
    next_id: u64,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium is needed for the browser tests (apt-get install chromium)");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let url = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let url = lines
                .by_ref()
                .map_while(Result::ok)
                .find_map(|l| {
                    l.split_once("DevTools listening on ")
                        .map(|(_, u)| u.trim().to_owned())
                })
                .expect("chromium announces its DevTools address");
            // Keep draining stderr so chromium never blocks on it.
            std::thread::spawn(move || lines.for_each(drop));
            url
        });
        let url = tokio::time::timeout(WAIT * 3, url).await.unwrap().unwrap();
        let (ws, _) = ws_connect(url.as_str()).await.unwrap();
        let mut b = Browser {
            child,
            _profile: profile,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = b
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b
    }

    /// One DevTools command; its `result` (events in between are skipped).
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(WAIT * 3, self.ws.next())
                .await
                .expect("DevTools answers")
                .unwrap()
                .unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn goto(&mut self, url: &str) {
        let session = self.session.clone();
        self.call(Some(&session), "Page.navigate", json!({"url": url}))
            .await;
        // Wait until the page is the one asked for and loaded.
        for _ in 0..200 {
            let v = self
                .eval_raw("document.readyState + ' ' + location.href")
                .await;
            if v.as_str() == Some(&format!("complete {url}")) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("{url} did not load");
    }

    async fn eval_raw(&mut self, expression: &str) -> Value {
        let session = self.session.clone();
        let r = self
            .call(
                Some(&session),
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "script failed: {r}");
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
