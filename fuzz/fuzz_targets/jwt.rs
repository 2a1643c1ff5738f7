//! Token checking: the header reader (`alg`, `kid`) and verification against fixed keys.
//!
//! Input byte 0 picks a mode. Raw: the rest is the token as sent. Signed: the rest is
//! `header JSON 0xFF claims JSON`, made into a token signed with HS256 — with the server's
//! secret (the claims checks are reached) or with another one (must never verify).
//! Invariants: no panic; a token signed with a key the server does not hold never verifies.
#![no_main]

use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use ringcast::edge::jwt::{Key, Rules, TokenError, Verifier};
use std::sync::OnceLock;

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let keys = vec![
            Key::hs256(SECRET),
            Key::public_pem(
                Some("rs-a".into()),
                Algorithm::RS256,
                include_bytes!("../../tests/fixtures/keys/rs-a.pub.pem"),
            )
            .unwrap(),
            Key::public_pem(
                Some("es-a".into()),
                Algorithm::ES256,
                include_bytes!("../../tests/fixtures/keys/es-a.pub.pem"),
            )
            .unwrap(),
        ];
        let rules = Rules {
            leeway_secs: 30,
            audience: Some("ringcast".into()),
            issuer: None,
        };
        Verifier::new(keys, rules)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let _ = verifier().verify(&String::from_utf8_lossy(rest));
        return;
    }
    let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
    };
    let message = format!("{}.{}", b64url(header), b64url(claims));
    let ours = mode & 2 == 0;
    let secret: &[u8] = if ours { SECRET } else { b"some-other-secret" };
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .unwrap();
    let result = verifier().verify(&format!("{message}.{signature}"));
    if !ours {
        assert!(
            result.is_err(),
            "a token signed with another secret verified: {result:?}"
        );
    }
    if let Err(e) = result {
        let _ = e.to_string();
        let _ = e == TokenError::Missing;
    }
});

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}
