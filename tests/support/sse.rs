//! A Server-Sent Events client over raw TCP that parses the stream as a browser would.

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{request_head, Server, WAIT};

/// One SSE message (or comment) as a browser would parse it.
#[derive(Debug, Default)]
pub struct Msg {
    pub id: Option<String>,
    pub data: Option<String>,
    pub comment: Option<String>,
    pub retry: Option<u64>,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().expect("a data message")).unwrap()
    }
}

pub struct Sse {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Sse {
    /// Opens `path_and_query` with `extra` headers; returns the status and head, and the
    /// stream when the status is 200.
    pub async fn open(
        server: &Server,
        path_and_query: &str,
        extra: &str,
    ) -> (u16, String, Option<Sse>) {
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n{extra}\r\n",
            server.addr
        );
        let (stream, head, buf) = request_head(server.addr, &req).await;
        let status: u16 = head[9..12].parse().unwrap();
        let sse = (status == 200).then_some(Sse { stream, buf });
        (status, head, sse)
    }

    pub async fn connect(server: &Server, path_and_query: &str, extra: &str) -> Sse {
        let (status, head, sse) = Sse::open(server, path_and_query, extra).await;
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("Content-Type: text/event-stream"), "{head}");
        sse.unwrap()
    }

    /// The next message or comment; None at the end of the stream.
    pub async fn next(&mut self) -> Option<Msg> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..at + 2).collect();
                let mut msg = Msg::default();
                for line in String::from_utf8(block).unwrap().lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        msg.comment = Some(c.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        msg.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        msg.retry = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        msg.data = Some(match msg.data.take() {
                            Some(d) => format!("{d}\n{v}"),
                            None => v.to_owned(),
                        });
                    } else {
                        assert!(line.is_empty(), "unexpected line {line:?}");
                    }
                }
                return Some(msg);
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a message within the wait bound")
                .unwrap_or(0);
            if n == 0 {
                assert!(self.buf.is_empty(), "stream ended mid-message");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next data message (comments and `retry:` skipped).
    pub async fn data(&mut self) -> Msg {
        loop {
            let m = self.next().await.expect("stream open");
            if m.data.is_some() {
                return m;
            }
        }
    }

    /// Reads past the welcome and one `subscribed` per channel; returns the welcome.
    pub async fn opened(&mut self, channels: usize) -> Msg {
        let first = self.next().await.unwrap();
        assert_eq!(first.retry, Some(1000), "the stream starts with retry:");
        let welcome = self.data().await;
        assert_eq!(welcome.json()["type"], "welcome");
        for _ in 0..channels {
            assert_eq!(self.data().await.json()["type"], "subscribed");
        }
        welcome
    }
}
