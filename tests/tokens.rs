//! End to end: token algorithms, key rotation by `kid`, audience and issuer, in-band refresh
//! and the 4001 close of a token that expires.

mod support;

use jsonwebtoken::Algorithm;
use ringcast::edge::jwt::sign_pem;
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Error as WsError;

fn key(name: &str) -> String {
    format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(key(name)).unwrap()
}

fn signed(alg: Algorithm, kid: Option<&str>, private: &str, claims: Value) -> String {
    let mut claims = claims;
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now_secs() + 3600);
    }
    sign_pem(alg, kid, &pem(private), &claims).unwrap()
}

async fn status_of(server: &Server, token: &str) -> (u16, String) {
    let url = server.url(&format!("/ws?channels=project:p1&token={token}"));
    match ws_connect(url).await {
        Ok(_) => (101, String::new()),
        Err(WsError::Http(resp)) => (
            resp.status().as_u16(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default(),
        ),
        Err(e) => panic!("{e}"),
    }
}

fn keyed_server(extra: &[(&str, &str)]) -> Server {
    let keys = format!(
        "a@RS256:{},b@RS256:{},ES256:{}",
        key("rs-a.pub.pem"),
        key("rs-b.pub.pem"),
        key("es-a.pub.pem")
    );
    let mut env = vec![("RINGCAST_JWT_PUBLIC_KEYS", keys.as_str())];
    env.extend_from_slice(extra);
    Server::start_with(&env)
}

#[tokio::test]
async fn each_algorithm_and_each_rotated_key_is_accepted() {
    let server = keyed_server(&[]);
    let claims = json!({"sub": "u1", "projects": ["p1"]});
    let tokens = [
        ("HS256 secret", token(claims.clone())),
        (
            "RS256 kid a",
            signed(Algorithm::RS256, Some("a"), "rs-a.pem", claims.clone()),
        ),
        (
            "RS256 kid b",
            signed(Algorithm::RS256, Some("b"), "rs-b.pem", claims.clone()),
        ),
        (
            "ES256",
            signed(Algorithm::ES256, None, "es-a.pem", claims.clone()),
        ),
    ];
    for (what, t) in tokens {
        assert_eq!(status_of(&server, &t).await.0, 101, "{what}");
    }
    // Rotation cannot be fooled: key b's signature under kid a, an unknown kid, expired.
    let refused = [
        (
            signed(Algorithm::RS256, Some("a"), "rs-b.pem", claims.clone()),
            "signature",
        ),
        (
            signed(Algorithm::RS256, Some("zz"), "rs-a.pem", claims.clone()),
            "key id",
        ),
        (
            signed(
                Algorithm::ES256,
                None,
                "es-a.pem",
                json!({"sub": "u1", "exp": now_secs() - 30}),
            ),
            "expired",
        ),
        (
            signed(
                Algorithm::RS256,
                Some("a"),
                "rs-a.pem",
                json!({"sub": "u1", "nbf": now_secs() + 600}),
            ),
            "not valid yet",
        ),
    ];
    for (t, why) in refused {
        let (status, body) = status_of(&server, &t).await;
        assert_eq!(status, 401, "{why}");
        assert!(body.contains(why), "{why}: {body}");
    }
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let server = keyed_server(&[
        ("RINGCAST_JWT_AUDIENCE", "dashboards"),
        ("RINGCAST_JWT_ISSUER", "auth.example"),
    ]);
    let base = json!({"sub": "u1", "projects": ["p1"], "aud": "dashboards", "iss": "auth.example"});
    let ok = signed(Algorithm::RS256, Some("a"), "rs-a.pem", base.clone());
    assert_eq!(status_of(&server, &ok).await.0, 101);
    for (patch, why) in [
        (json!({"aud": "billing"}), "audience"),
        (json!({"iss": "evil.example"}), "issuer"),
    ] {
        let mut claims = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let (status, body) =
            status_of(&server, &signed(Algorithm::ES256, None, "es-a.pem", claims)).await;
        assert_eq!(status, 401);
        assert!(body.contains(why), "{body}");
    }
    let mut no_aud = base.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    assert_eq!(status_of(&server, &token(no_aud)).await.0, 401);
}

#[tokio::test]
async fn refresh_in_time_keeps_the_connection_too_late_closes_it_with_4001() {
    let server = Server::start_with(&[("RINGCAST_PING_INTERVAL_MS", "100")]); // sweep every 25 ms
    let short =
        |secs: u64| token(json!({"sub": "u1", "projects": ["p1"], "exp": now_secs() + secs}));
    let (mut refreshed, _) =
        connect(&server, &format!("channels=project:p1&token={}", short(2))).await;
    recv_json(&mut refreshed).await;
    let (mut lapsed, _) =
        connect(&server, &format!("channels=project:p1&token={}", short(2))).await;
    recv_json(&mut lapsed).await;

    // A refresh for someone else, or with a bad token, is refused and changes nothing.
    let other = token(json!({"sub": "u2", "projects": ["p1"]}));
    send_json(&mut refreshed, &json!({"type": "refresh", "token": other})).await;
    let (err, _) = recv_until_type(&mut refreshed, "error").await;
    assert_eq!(err["code"], "bad_token");
    send_json(
        &mut refreshed,
        &json!({"type": "refresh", "token": "garbage"}),
    )
    .await;
    assert_eq!(
        recv_until_type(&mut refreshed, "error").await.0["code"],
        "bad_token"
    );

    let exp = now_secs() + 3600;
    let fresh = token(json!({"sub": "u1", "projects": ["p1"], "exp": exp}));
    send_json(&mut refreshed, &json!({"type": "refresh", "token": fresh})).await;
    let (ok, _) = recv_until_type(&mut refreshed, "refreshed").await;
    assert_eq!(ok["exp"], exp);

    // The one that did not refresh is closed once its token expires...
    assert_eq!(recv_close(&mut lapsed).await, 4001);
    // ...while the refreshed one, past the same moment, still receives.
    server
        .publish_one("project:p1", "after-expiry", json!(1))
        .await;
    let (ev, _) = recv_until_event(&mut refreshed, "after-expiry").await;
    assert_eq!(ev["data"], 1);
}

#[tokio::test]
async fn a_refresh_with_fewer_rights_ends_the_lost_subscriptions() {
    let server = Server::start();
    let wide = token(json!({"sub": "u1", "projects": ["p1", "p2"]}));
    let (mut ws, _) = connect(
        &server,
        &format!("channels=project:p1,project:p2&token={wide}"),
    )
    .await;
    recv_json(&mut ws).await;
    recv_json(&mut ws).await;
    let narrow = token(json!({"sub": "u1", "projects": ["p1"]}));
    send_json(&mut ws, &json!({"type": "refresh", "token": narrow})).await;
    let (gone, _) = recv_until_type(&mut ws, "unsubscribed").await;
    assert_eq!(
        gone,
        json!({"type": "unsubscribed", "channel": "project:p2", "reason": "forbidden"})
    );
    recv_until_type(&mut ws, "refreshed").await;
    server
        .publish_one("project:p2", "hidden", json!(null))
        .await;
    server.publish_one("project:p1", "seen", json!(null)).await;
    assert_eq!(recv_json(&mut ws).await["event"], "seen");
}

async fn recv_until_event(ws: &mut Ws, event: &str) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = recv_json(ws).await;
        if v["event"] == event {
            return (v, before);
        }
        before.push(v);
    }
}
