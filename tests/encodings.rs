//! End to end: MessagePack connections get the same maps as JSON ones, in binary frames.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

async fn recv_msgpack(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match msg {
            Message::Binary(b) => return rmp_serde::from_slice(&b).expect("a MessagePack map"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn messagepack_clients_get_the_same_events_as_json_clients() {
    let server = Server::start();
    let t = admin_token();
    let (mut json_ws, _) = connect(&server, &format!("channels=task:m&token={t}")).await;
    recv_json(&mut json_ws).await;
    let (mut mp, _) = ws_connect(server.url(&format!(
        "/ws?channels=task:m&token={t}&encoding=messagepack"
    )))
    .await
    .unwrap();
    let welcome = recv_msgpack(&mut mp).await;
    assert_eq!(
        (welcome["type"].as_str(), welcome["encoding"].as_str()),
        (Some("welcome"), Some("messagepack"))
    );
    assert_eq!(recv_msgpack(&mut mp).await["type"], "subscribed");
    let data = json!({"task": "t1", "progress": 0.5, "steps": [1, 2, 3], "ok": true, "note": null, "é": "ü"});
    for i in 0..3 {
        let seq = server
            .publish_one("task:m", "task:progress", json!({"i": i, "d": data}))
            .await;
        let from_json = recv_json(&mut json_ws).await;
        let from_mp = recv_msgpack(&mut mp).await;
        assert_eq!(from_mp, from_json, "same map for seq {seq}");
    }
    // Client messages may be MessagePack maps too.
    let sub =
        rmp_serde::to_vec_named(&json!({"type": "subscribe", "channels": ["task:n"]})).unwrap();
    mp.send(Message::binary(sub)).await.unwrap();
    assert_eq!(
        recv_msgpack(&mut mp).await,
        json!({"type": "subscribed", "channel": "task:n", "seq": 0})
    );
}

#[tokio::test]
async fn an_unknown_encoding_falls_back_to_json_with_a_note() {
    let server = Server::start();
    let (_ws, welcome) = connect(&server, &format!("token={}&encoding=cbor", admin_token())).await;
    assert_eq!(welcome["encoding"], "json");
    assert!(
        welcome["note"]
            .as_str()
            .unwrap()
            .contains("\"cbor\" is not supported"),
        "{welcome}"
    );
}
