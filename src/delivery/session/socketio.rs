//! A session speaking Socket.IO v5 over Engine.IO v4 (`/socket.io/`): the same session, with
//! other framing. Client packets arrive as WebSocket text frames (`4` + a Socket.IO packet);
//! the session's answers go out as `42["ringcast:<type>",{...}]` events, or as the
//! acknowledgement (`43<id>[{...,"ok":…}]`) of the client event that asked, when it carried
//! an acknowledgement id.
//!
//! The seeds' events: `task:join {taskId}` subscribes `task:<taskId>` and answers `task:state`;
//! `dashboard:join {}` subscribes `dashboard` and answers `dashboard:state`;
//! `resync_requested {taskIds}` answers `task:state` for each task again. A state is made of
//! what the channel's replay ring holds: the newest event per `coalesce_key` (per event name
//! for events without one), in seq order, current as of the `seq` it carries; live events
//! follow it with no gap and no repeat.
//!
//! Bound: an event names at most `max_channels_per_connection` tasks; acknowledgements and
//! state replies in flight are at most one per subscription.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{Ctx, Effect, Session, SessionConfig, SubState};
use crate::delivery::heartbeat::HeartbeatConfig;
use crate::delivery::recovery::{Positions, Record};
use crate::delivery::sequencer::{Resume, SubscribeAck};
use crate::proto::engineio::{self, Packet as EnginePacket};
use crate::proto::msg::{self, Encoding, ErrorCode, Format};
use crate::proto::socketio::{self, Kind};
use crate::proto::ws::codec;

/// What a Socket.IO session has in flight (kept in the session's cold state).
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// The acknowledgement id of the client event being handled: its first answer goes
    /// there.
    ack: Option<u64>,
    /// Subscriptions whose acknowledgement waits for the owner's answer.
    subscribe_acks: Vec<(Arc<str>, u64)>,
    /// Subscriptions answered with a state event (`task:state`...) instead of a replay.
    states: Vec<(Arc<str>, StateReply)>,
    /// Binary attachments still to come for a binary packet (dropped as they arrive).
    attachments: u32,
    /// Connection state recovery: the private session id the client got...
    pid: Option<Box<str>>,
    /// ...and, while it recovers, the id and welcome to use instead if the recovery fails.
    if_lost: Option<(Box<str>, Bytes)>,
    /// Events written so far, and where each channel stands in that count.
    written: u64,
    positions: Vec<(Arc<str>, Positions)>,
}

impl Pending {
    pub(super) fn is_idle(&self) -> bool {
        self.ack.is_none()
            && self.subscribe_acks.is_empty()
            && self.states.is_empty()
            && self.attachments == 0
            && self.pid.is_none()
            && self.if_lost.is_none()
            && self.positions.is_empty()
    }
}

/// How a subscription's state is answered: the event's name and the fields it starts with.
#[derive(Debug)]
struct StateReply {
    event: &'static str,
    fields: Map<String, Value>,
}

/// The heartbeat a session of this format follows.
pub(super) fn heartbeat_config(format: Format, config: &SessionConfig) -> &HeartbeatConfig {
    match format.encoding {
        Encoding::SocketIo => &config.socketio_heartbeat,
        _ => &config.heartbeat,
    }
}

/// Engine.IO's ping: a text frame of `2`.
pub(super) fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x81, 0x01, b'2'])
}

/// Socket.IO's answer to a CONNECT: `40{"sid":…,"pid":…}` (sent as the session's welcome;
/// `pid` only while connection state recovery is on).
pub fn connect_frame(sid: &str, pid: Option<&str>) -> Bytes {
    let body = match pid {
        Some(pid) => json!({ "sid": sid, "pid": pid }),
        None => json!({ "sid": sid }),
    };
    msg::engineio_frame(&format!("40{body}"))
}

/// A CONNECT refused: `44{"message":…}`, which the client's `connect_error` handler gets.
pub fn connect_error_frame(namespace: &str, message: &str, data: Option<Value>) -> Bytes {
    let mut body = json!({ "message": message });
    if let Some(data) = data {
        body["data"] = data;
    }
    let packet = socketio::Packet {
        kind: Kind::ConnectError,
        attachments: 0,
        namespace,
        id: None,
        data: Some(&body.to_string()),
    };
    msg::engineio_frame(&format!("4{}", socketio::encode(&packet)))
}

impl Session {
    /// Connection state recovery: the private session id this session's client holds; while
    /// it recovers an earlier session, the id and welcome it gets instead should that fail.
    pub fn set_recovery(&mut self, pid: Box<str>, if_lost: Option<(Box<str>, Bytes)>) {
        let sio = &mut self.cold().sio;
        sio.pid = Some(pid);
        sio.if_lost = if_lost;
    }

    /// What this session leaves for its client's recovery (None if it has no private id: the
    /// client ended it on purpose, or recovery is off).
    pub fn recovery(&self, epoch: &str) -> Option<(String, Record)> {
        let sio = &self.cold.as_ref()?.sio;
        let pid = sio.pid.as_deref()?;
        let record = Record {
            user: self.claims.sub.clone(),
            epoch: epoch.to_owned(),
            channels: sio.positions.clone(),
        };
        Some((pid.to_owned(), record))
    }

    /// A subscription began: the client has everything of it up to `seq`.
    pub(super) fn note_subscribed(&mut self, channel: &Arc<str>, seq: u64) {
        let sio = &mut self.cold().sio;
        sio.positions.retain(|(c, _)| c != channel);
        let at = Positions::new(seq, sio.written);
        sio.positions.push((channel.clone(), at));
    }

    pub(super) fn note_unsubscribed(&mut self, channel: &str) {
        if let Some(cold) = self.cold.as_mut() {
            cold.sio.positions.retain(|(c, _)| &**c != channel);
        }
    }

    /// An event goes out: its place in the count.
    pub(super) fn note_written(&mut self, d: &super::Delivery) {
        let Some(cold) = self.cold.as_mut() else {
            return;
        };
        let sio = &mut cold.sio;
        sio.written += 1;
        let w = sio.written;
        if let Some((_, p)) = sio.positions.iter_mut().find(|(c, _)| *c == d.channel) {
            p.written(w, d.seq);
        }
    }

    /// An initial subscription's replay could not give everything that was missed: a
    /// recovering client is told it did not recover (a new private id).
    pub(super) fn recovery_lost(&mut self) {
        let Some(cold) = self.cold.as_mut() else {
            return;
        };
        if let Some((pid, welcome)) = cold.sio.if_lost.take() {
            cold.sio.pid = Some(pid);
            cold.welcome = Some(welcome);
        }
    }

    pub(super) fn take_ack(&mut self) -> Option<u64> {
        self.cold.as_mut().and_then(|c| c.sio.ack.take())
    }

    /// The owner answered a subscription: its acknowledgement (if one waits) answers next.
    pub(super) fn ack_subscribed(&mut self, channel: &Arc<str>) {
        let Some(cold) = self.cold.as_mut() else {
            return;
        };
        let acks = &mut cold.sio.subscribe_acks;
        if let Some(at) = acks.iter().position(|(c, _)| c == channel) {
            cold.sio.ack = Some(acks.swap_remove(at).1);
        }
    }

    /// Answers a subscription asked with a state reply (`task:join`): the state event stands
    /// in for the replay. False if none was asked for.
    pub(super) fn answer_state(
        &mut self,
        channel: &Arc<str>,
        ack: &SubscribeAck,
        ctx: &Ctx,
    ) -> bool {
        let Some(cold) = self.cold.as_mut() else {
            return false;
        };
        let Some(at) = cold.sio.states.iter().position(|(c, _)| c == channel) else {
            return false;
        };
        let (_, reply) = cold.sio.states.swap_remove(at);
        self.note_subscribed(channel, ack.last_seq);
        let mut newest: Vec<&Arc<super::Delivery>> = Vec::new();
        if let Some(replay) = &ack.replay {
            for d in replay.deliveries.iter().filter(|d| self.wants(d)) {
                let key = |d: &super::Delivery| -> Box<str> {
                    d.coalesce_key.clone().unwrap_or_else(|| d.event.clone())
                };
                let k = key(d);
                newest.retain(|old| key(old) != k);
                newest.push(d);
            }
        }
        let events: Vec<Value> = newest
            .iter()
            .filter_map(|d| msg::parse_data(codec::server_frame_payload(&d.frame)).ok())
            .collect();
        let mut fields = reply.fields;
        fields.insert("channel".into(), Value::from(&**channel));
        fields.insert("seq".into(), ack.last_seq.into());
        fields.insert("events".into(), events.into());
        let frame = msg::socketio_event_frame(reply.event, &Value::Object(fields));
        self.push_control(frame, ctx.now, ctx.config);
        true
    }

    /// One text frame: an Engine.IO packet.
    pub(super) fn on_socketio_text(&mut self, text: &str, ctx: &Ctx, out: &mut Vec<Effect>) {
        match engineio::decode_text(text) {
            Err(e) => self.close(1008, &format!("malformed Engine.IO packet: {e}"), ctx.now),
            Ok(EnginePacket::Pong(_)) => self.heartbeat.handle_pong(ctx.now),
            Ok(EnginePacket::Ping(payload)) => {
                let pong = msg::engineio_frame(&format!("3{payload}"));
                self.push_control(pong, ctx.now, ctx.config);
            }
            Ok(EnginePacket::Close) => self.client_left(ctx),
            Ok(EnginePacket::Message(engineio::Data::Text(packet))) => {
                self.on_socketio_packet(packet, ctx, out)
            }
            // An upgrade is over once the session is here; open and noop mean nothing now.
            Ok(_) => {}
        }
    }

    /// One binary frame: an attachment of a binary packet (dropped: ringcast's controls
    /// carry no binary data), or a protocol error.
    pub(super) fn on_socketio_binary(&mut self, ctx: &Ctx) {
        match self.cold.as_mut().map(|c| &mut c.sio.attachments) {
            Some(n) if *n > 0 => {
                *n -= 1;
                self.shed_cold();
            }
            _ => self.close(1008, "a binary frame that no packet announced", ctx.now),
        }
    }

    /// The client disconnected its socket (or closed the transport): the session ends.
    fn client_left(&mut self, ctx: &Ctx) {
        let cold = self.cold();
        cold.sio.pid = None; // ended on purpose: nothing to recover
        cold.sio.if_lost = None;
        cold.closed_with
            .get_or_insert_with(|| (1000, "disconnected by the client".into()));
        self.close(1000, "", ctx.now);
    }

    fn on_socketio_packet(&mut self, text: &str, ctx: &Ctx, out: &mut Vec<Effect>) {
        let packet = match socketio::decode(text) {
            Ok(p) => p,
            Err(e) => {
                return self.close(1008, &format!("malformed Socket.IO packet: {e}"), ctx.now)
            }
        };
        if packet.kind.is_binary() {
            self.cold().sio.attachments = packet.attachments;
        }
        if packet.namespace != "/" {
            if packet.kind == Kind::Connect {
                let refusal = connect_error_frame(packet.namespace, "Invalid namespace", None);
                self.push_control(refusal, ctx.now, ctx.config);
            }
            return; // other namespaces are not served: their packets are ignored
        }
        match packet.kind {
            Kind::Event => {
                let data = packet.data.unwrap_or("[]");
                self.on_socketio_event(data, packet.id, ctx, out);
            }
            Kind::BinaryEvent => {
                self.cold().sio.ack = packet.id;
                let message = "binary payloads are not supported: send JSON";
                self.error(ErrorCode::BinaryNotSupported, message, None, ctx);
            }
            Kind::Disconnect => self.client_left(ctx),
            // Already connected; acknowledgements of ours are never asked for.
            Kind::Connect | Kind::Ack | Kind::BinaryAck | Kind::ConnectError => {}
        }
        self.shed_cold();
    }

    /// A client event: `[name, argument?]`, answered through its acknowledgement if it has
    /// an id.
    fn on_socketio_event(&mut self, data: &str, id: Option<u64>, ctx: &Ctx, out: &mut Vec<Effect>) {
        let Ok(mut args) = serde_json::from_str::<Vec<Value>>(data) else {
            return self.close(1008, "malformed Socket.IO event", ctx.now);
        };
        let name = match args.first() {
            Some(Value::String(s)) => s.clone(),
            _ => return self.close(1008, "a Socket.IO event without a name", ctx.now),
        };
        let arg = if args.len() > 1 {
            args.swap_remove(1)
        } else {
            Value::Null
        };
        self.cold().sio.ack = id;
        match name.as_str() {
            "task:join" => match task_id(&arg) {
                Some(task) => self.join_with_state(&format!("task:{task}"), task, ctx, out),
                None => self.bad_argument("task:join needs {\"taskId\": …}", ctx),
            },
            "task:leave" => match task_id(&arg) {
                Some(task) => self.leave(&format!("task:{task}"), ctx, out),
                None => self.bad_argument("task:leave needs {\"taskId\": …}", ctx),
            },
            "dashboard:join" => self.join_with_state("dashboard", String::new(), ctx, out),
            "dashboard:leave" => self.leave("dashboard", ctx, out),
            "resync_requested" => self.resync(&arg, ctx, out),
            "subscribe" | "unsubscribe" | "filter" | "ack" | "refresh" | "pause" | "resume"
            | "presence" => {
                let message = control_message(&name, arg);
                let named = message
                    .get("channels")
                    .and_then(Value::as_array)
                    .and_then(|c| c.first())
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                self.on_message(message.to_string().as_bytes(), ctx, out);
                if let Some(first) = named.filter(|_| name == "subscribe") {
                    self.defer_ack(&first);
                }
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                let message = format!("unknown event \"{shown}\"");
                self.error(ErrorCode::UnknownType, &message, None, ctx);
            }
        }
        // Whatever asked for an acknowledgement and was not answered yet: it was done.
        if let Some(id) = self.take_ack() {
            let frame = msg::socketio_ack_frame(id, &json!({ "ok": true }));
            self.push_control(frame, ctx.now, ctx.config);
        }
    }

    fn bad_argument(&mut self, message: &str, ctx: &Ctx) {
        self.error(ErrorCode::BadMessage, message, None, ctx);
    }

    /// A subscription was asked for with an unanswered acknowledgement: it answers when the
    /// owner does.
    fn defer_ack(&mut self, channel: &str) {
        let pending = self
            .subs
            .iter()
            .find(|(c, s)| &**c == channel && *s != SubState::Active)
            .map(|(c, _)| c.clone());
        if let (Some(channel), Some(id)) = (pending, self.take_ack()) {
            self.cold().sio.subscribe_acks.push((channel, id));
        }
    }

    /// Subscribes `channel` answering with its state (`task:state` for a task, else
    /// `dashboard:state`); a channel already subscribed is answered again.
    fn join_with_state(&mut self, channel: &str, task: String, ctx: &Ctx, out: &mut Vec<Effect>) {
        if self.subs.iter().any(|(c, _)| &**c == channel) {
            self.drop_subscription(channel, out);
        }
        // Everything the channel's history holds: the state is made from it.
        if let Err(e) = self.subscribe(channel, Resume::Held, false, ctx, out) {
            return self.error(e.code, &e.message, Some(channel), ctx);
        }
        let (event, fields) = if task.is_empty() {
            ("dashboard:state", Map::new())
        } else {
            let mut fields = Map::new();
            fields.insert("taskId".into(), task.into());
            ("task:state", fields)
        };
        let channel: Arc<str> = self.subs.last().expect("just subscribed").0.clone();
        let sio = &mut self.cold().sio;
        sio.states.retain(|(c, _)| *c != channel);
        sio.states
            .push((channel.clone(), StateReply { event, fields }));
        self.defer_ack(&channel);
    }

    fn leave(&mut self, channel: &str, ctx: &Ctx, out: &mut Vec<Effect>) {
        if let Err(e) = self.unsubscribe(channel, None, ctx, out) {
            self.error(e.code, &e.message, Some(channel), ctx);
        }
    }

    /// Ends a subscription without telling the client (it is asked for again at once).
    fn drop_subscription(&mut self, channel: &str, out: &mut Vec<Effect>) {
        let Some(at) = self.subs.iter().position(|(c, _)| &**c == channel) else {
            return;
        };
        let (channel, state) = self.subs.swap_remove(at);
        self.purge(|d| d.channel == channel);
        self.note_unsubscribed(&channel);
        if let Some(cold) = self.cold.as_mut() {
            cold.sio.states.retain(|(c, _)| *c != channel);
            cold.sio.subscribe_acks.retain(|(c, _)| *c != channel);
        }
        out.push(Effect::Unsubscribe {
            channel,
            joined: state == SubState::Active,
        });
    }

    /// `resync_requested {taskIds}`: each task's state again (joining those not joined yet).
    fn resync(&mut self, arg: &Value, ctx: &Ctx, out: &mut Vec<Effect>) {
        let ids: Option<Vec<String>> = arg
            .get("taskIds")
            .and_then(Value::as_array)
            .and_then(|ids| ids.iter().map(id_text).collect());
        let Some(ids) = ids else {
            return self.bad_argument("resync_requested needs {\"taskIds\": […]}", ctx);
        };
        let max = ctx.config.max_channels_per_connection;
        if ids.len() > max {
            let message = format!("an event may name at most {max} tasks");
            return self.error(ErrorCode::TooManyChannels, &message, None, ctx);
        }
        // One acknowledgement for the whole request: answered now.
        let ack = self.take_ack();
        for task in ids {
            self.join_with_state(&format!("task:{task}"), task, ctx, out);
            // Errors of single tasks went out as events; nothing waits for an ack per task.
            if let Some(cold) = self.cold.as_mut() {
                cold.sio.ack = None;
            }
        }
        if let Some(id) = ack {
            let frame = msg::socketio_ack_frame(id, &json!({ "ok": true }));
            self.push_control(frame, ctx.now, ctx.config);
        }
    }
}

/// A ringcast control event's argument as the client message it stands for: `{...}` with its
/// `type`; `subscribe`/`unsubscribe` also take `{channel}` or a bare channel name.
fn control_message(name: &str, arg: Value) -> Value {
    let mut map = match arg {
        Value::Object(map) => map,
        Value::String(channel) if name == "subscribe" || name == "unsubscribe" => {
            let mut map = Map::new();
            map.insert("channels".into(), json!([channel]));
            map
        }
        _ => Map::new(),
    };
    if name == "subscribe" || name == "unsubscribe" {
        if let Some(channel) = map.remove("channel") {
            map.entry("channels").or_insert_with(|| json!([channel]));
        }
    }
    map.insert("type".into(), Value::from(name));
    Value::Object(map)
}

/// `{"taskId": "t1"}` or `{"taskId": 7}`: the id as text.
fn task_id(arg: &Value) -> Option<String> {
    arg.get("taskId").and_then(id_text)
}

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
