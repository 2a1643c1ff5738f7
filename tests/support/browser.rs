//! A headless Chromium with one page, driven over the DevTools protocol (tests/browser.rs,
//! tests/socketio_browser.rs). Needs `chromium` (Debian's package; tests/run.sh installs it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{ws_connect, Ws, WAIT};

/// A headless Chromium with one page, driven over the DevTools protocol.
pub struct Browser {
    child: Child,
    profile: std::path::PathBuf,
    ws: Ws,
    session: String,
    next_id: u64,
}

impl Browser {
    pub async fn launch() -> Browser {
        static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{}-{n}", std::process::id()));
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
            profile,
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
    pub async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
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

    pub async fn goto(&mut self, url: &str) {
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

    /// Evaluates `expression` in the page (awaiting it when it is a promise): its value, or
    /// what it threw (the exception's description: for an `Error`, its message and stack).
    pub async fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let session = self.session.clone();
        let r = self
            .call(
                Some(&session),
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            None => Ok(r["result"]["value"].clone()),
            Some(e) => Err(e["exception"]["description"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string())),
        }
    }

    pub async fn eval_raw(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
