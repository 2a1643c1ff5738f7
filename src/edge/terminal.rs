//! `POST /api/v1/terminal/{task_id}?project_id=P&stream=stdout|stderr`: a producer streams a
//! task's terminal output in a request body kept open (`Transfer-Encoding: chunked`, or a
//! `Content-Length` body for output that is already complete).
//!
//! Output is cut by `delivery::terminal::Chunker` (≤ 4 KiB, never inside a UTF-8 character or
//! an ANSI escape), paced by a `Pacer` at `terminal_max_bytes_per_sec`, and published as
//! ephemeral `stdout`/`stderr` events on `terminal:{task_id}` with `project_id` P, then `end`.
//!
//! Invariant: what the producer sent is published byte for byte and in order, or the stream
//! ends with an `end` event saying why not; a producer faster than the cap is slowed down (its
//! body is read no faster), never buffered beyond the chunk in hand, never dropped.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::json;

use crate::delivery::terminal::{self, Chunker, Pacer, PacerConfig};
use crate::delivery::{channel, Priority, Publication};
use crate::proto::http::{BodyPart, ChunkedBody, Request};
use crate::runtime::core::{Core, Received};

use super::http::{bearer, linger_close, same_secret, Edge, Reply, LINGER};
use super::publish::{NotSequenced, BEHIND};
use crate::runtime::mesh::Source;

/// How long held bytes (an unfinished escape or character) wait for the rest before they go.
const IDLE_FLUSH: Duration = Duration::from_millis(100);
/// How long output waits for a core that is behind before the stream ends with 503.
const BEHIND_PATIENCE: Duration = Duration::from_secs(10);
/// How often waiting output asks again.
const BEHIND_RETRY: Duration = Duration::from_millis(10);

/// The task of a producer path, if `path` is one.
pub fn route(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1/terminal/")
        .filter(|t| !t.is_empty() && !t.contains('/'))
}

/// One producer's stream, as its request named it.
struct Producer {
    channel: Arc<str>,
    project_id: Box<str>,
    stream: &'static str,
}

enum Body {
    Chunked(ChunkedBody),
    /// Bytes of a `Content-Length` body still to come.
    Length(usize),
}

pub async fn produce(
    edge: &Edge,
    core: Rc<Core>,
    mut socket: TcpStream,
    req: Request,
    mut buf: BytesMut,
) {
    let (producer, mut body) = match check(edge, &core, &req) {
        Ok(p) => p,
        Err(reply) => {
            let _ = socket.write_all(reply.encode(false)).await;
            return linger_close(socket, LINGER).await;
        }
    };
    if req.has_token("expect", "100-continue") {
        let (res, _) = socket
            .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
            .await;
        if res.is_err() {
            return;
        }
    }
    drop(req);
    let cap = core.shared.settings.terminal_max_bytes_per_sec;
    let mut out = Output {
        core: &core,
        producer: &producer,
        pacer: Pacer::new(PacerConfig {
            bytes_per_sec: cap,
            ..PacerConfig::default()
        }),
        offset: 0,
        chunks: 0,
    };
    let mut chunker = Chunker::new();
    let mut pieces: Vec<Bytes> = Vec::new();
    let ended: Result<(), &'static str> = loop {
        let part = match &mut body {
            Body::Chunked(c) => match c.next(&mut buf) {
                Ok(part) => part,
                Err(e) => break Err(e.reason()),
            },
            Body::Length(0) => BodyPart::End,
            Body::Length(_) if buf.is_empty() => BodyPart::More,
            Body::Length(left) => {
                let take = (*left).min(buf.len());
                *left -= take;
                BodyPart::Data(buf.split_to(take).freeze())
            }
        };
        match part {
            BodyPart::Data(data) => chunker.push(&data, &mut pieces),
            BodyPart::End => {
                chunker.finish(&mut pieces);
                if let Err(why) = out.send(&mut pieces).await {
                    break Err(why);
                }
                break Ok(());
            }
            BodyPart::More => {
                if let Err(why) = out.send(&mut pieces).await {
                    break Err(why);
                }
                match read(&core, &socket, &mut buf, chunker.held() > 0).await {
                    Read::Data => {}
                    Read::Idle => chunker.finish(&mut pieces),
                    Read::Closed => break Err("producer disconnected"),
                }
            }
        }
    };
    if ended.is_err() {
        // What arrived before the failure still goes out, then the end says why it stopped.
        chunker.finish(&mut pieces);
        let _ = out.send(&mut pieces).await;
    }
    let reason = match ended {
        Ok(()) => "complete",
        Err(why) => why,
    };
    let end = json!({"stream": producer.stream, "bytes": out.offset, "reason": reason});
    let _ = out.publish("end", end.to_string()).await;
    let reply = match ended {
        Ok(()) => Reply::json(
            200,
            serde_json::to_vec(&json!({
                "channel": producer.channel, "stream": producer.stream,
                "bytes": out.offset, "chunks": out.chunks
            }))
            .expect("json"),
        ),
        Err("producer disconnected") => return,
        Err(BEHIND) => Reply::error(503, BEHIND).with_header("Retry-After", "1"),
        Err(why) => Reply::error(400, why),
    };
    let _ = socket.write_all(reply.encode(false)).await;
    // After a bad body the producer may still be sending: drain, so it reads the answer.
    linger_close(socket, LINGER).await;
}

fn check(edge: &Edge, core: &Core, req: &Request) -> Result<(Producer, Body), Reply> {
    match bearer(req) {
        Some(key) if same_secret(key, &edge.api_key) => {}
        _ => {
            return Err(
                Reply::error(401, "producing needs Authorization: Bearer <API key>")
                    .with_header("WWW-Authenticate", "Bearer"),
            )
        }
    }
    if core.shared.is_draining() {
        return Err(Reply::error(
            503,
            "node is draining; produce to another node",
        ));
    }
    let task = route(&req.path).ok_or_else(|| Reply::error(404, "no such endpoint"))?;
    let name = format!("{}{task}", terminal::CHANNEL_PREFIX);
    channel::validate(&name).map_err(|e| Reply::error(400, &format!("task id: {e}")))?;
    let project_id = match req.query_param("project_id") {
        Some(p) if !p.is_empty() && p.len() <= 128 && !p.chars().any(char::is_control) => p,
        Some(_) => {
            return Err(Reply::error(
                400,
                "project_id must be 1 to 128 printable bytes",
            ))
        }
        None => return Err(Reply::error(400, "project_id is required")),
    };
    let stream = match req.query_param("stream").as_deref() {
        None | Some("stdout") => "stdout",
        Some("stderr") => "stderr",
        Some(_) => return Err(Reply::error(400, "stream must be stdout or stderr")),
    };
    let codings: Vec<&str> = req.tokens("transfer-encoding").collect();
    let body = if codings.len() == 1 && codings[0].eq_ignore_ascii_case("chunked") {
        Body::Chunked(ChunkedBody::default())
    } else if req.header("transfer-encoding").is_some() {
        return Err(Reply::error(
            501,
            "only Transfer-Encoding: chunked is supported",
        ));
    } else {
        match req.content_length() {
            Ok(n) => Body::Length(n),
            Err(e) => return Err(Reply::error(e.status(), e.reason())),
        }
    };
    let producer = Producer {
        channel: name.into(),
        project_id: project_id.into(),
        stream,
    };
    Ok((producer, body))
}

/// Publishes a producer's chunks, paced.
struct Output<'a> {
    core: &'a Core,
    producer: &'a Producer,
    pacer: Pacer,
    /// Bytes of output published so far (the next chunk's offset).
    offset: u64,
    chunks: u64,
}

impl Output<'_> {
    async fn send(&mut self, pieces: &mut Vec<Bytes>) -> Result<(), &'static str> {
        for piece in pieces.drain(..) {
            while let Err(wait) = self.pacer.try_take(Instant::now(), piece.len()) {
                monoio::time::sleep(wait).await;
            }
            let data = terminal::chunk_data(self.offset, &piece);
            self.publish(self.producer.stream, data).await?;
            self.offset += piece.len() as u64;
            self.chunks += 1;
        }
        Ok(())
    }

    async fn publish(&self, event: &str, data: String) -> Result<(), &'static str> {
        let mut p = Publication::new(self.producer.channel.clone(), event, &data);
        p.project_id = Some(self.producer.project_id.clone());
        p.ephemeral = true;
        // Paced at the source: not subject to the event-count rate limits, drops or TTL that
        // protect clients from floods (a gap would garble the terminal); a subscriber that
        // falls more than `max_queue_bytes` behind is closed (1008) instead.
        p.priority = Priority::Critical;
        // A core that is behind holds the output back (and with it the upload: TCP pushes
        // back on the producer) rather than drop it, for up to `BEHIND_PATIENCE`.
        let deadline = Instant::now() + BEHIND_PATIENCE;
        loop {
            match self.core.publish(vec![p.clone()], Source::Api).await {
                Ok(_) => return Ok(()),
                Err(NotSequenced::ShuttingDown) => return Err("node is shutting down"),
                // Not retried: the chunk may have been stored, and a repeat would garble.
                Err(NotSequenced::Unavailable) => {
                    return Err("redis did not take the output in time")
                }
                Err(NotSequenced::Behind) if Instant::now() >= deadline => return Err(BEHIND),
                Err(NotSequenced::Behind) => monoio::time::sleep(BEHIND_RETRY).await,
            }
        }
    }
}

enum Read {
    Data,
    /// Nothing came for `IDLE_FLUSH` (asked only while bytes are held).
    Idle,
    Closed,
}

/// Waits for more of the body (readiness, then one non-blocking read into `buf`).
async fn read(core: &Core, socket: &TcpStream, buf: &mut BytesMut, idle_flush: bool) -> Read {
    let ready = socket.readable(false);
    let ready = if idle_flush {
        match monoio::time::timeout(IDLE_FLUSH, ready).await {
            Ok(r) => r,
            Err(_) => return Read::Idle,
        }
    } else {
        ready.await
    };
    if ready.is_err() {
        return Read::Closed;
    }
    match core.recv_into(socket, buf) {
        Received::Data | Received::NotReady => Read::Data,
        Received::Closed => Read::Closed,
    }
}
