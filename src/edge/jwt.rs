//! Token checking at the edge: JWTs (HS256 with a shared secret; RS256/ES256 with configured
//! public keys, chosen by `kid`) → `Claims`.
//!
//! Invariant: a connection exists only with claims from a token whose signature, `exp`, `nbf`
//! and (when configured) `aud` and `iss` checked out; the reason a token failed is logged and
//! answered, the token itself never is.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use crate::delivery::access::Claims;

/// Why a token was refused (answered as HTTP 401, or as an `error` frame to a refresh).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token: pass ?token=, Authorization: Bearer, or a bearer.<token> subprotocol")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed or lacks the sub claim")]
    Malformed,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token uses an algorithm this server does not accept")]
    WrongAlgorithm,
    #[error("token names a key id (kid) this server does not know")]
    UnknownKey,
    #[error("token is not for this audience")]
    WrongAudience,
    #[error("token is from another issuer")]
    WrongIssuer,
    /// `sub` names the user every limit, admin command and audit record is keyed by.
    #[error("token's sub claim is empty or holds control characters: it must name the user")]
    EmptySubject,
}

/// One key tokens may be signed with.
pub struct Key {
    /// Matched against the token header's `kid`; a key without one serves tokens without one.
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

impl Key {
    pub fn hs256(secret: &[u8]) -> Key {
        Key {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        }
    }

    /// A public key in PEM for RS256 or ES256.
    pub fn public_pem(kid: Option<String>, alg: Algorithm, pem: &[u8]) -> Result<Key, String> {
        let key = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => DecodingKey::from_ec_pem(pem),
            other => return Err(format!("{other:?} is not supported (RS256 or ES256)")),
        }
        .map_err(|e| format!("not a {alg:?} public key in PEM: {e}"))?;
        Ok(Key { kid, alg, key })
    }
}

/// What besides the signature a token must satisfy.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub leeway_secs: u64,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// Checks tokens against every configured key (several at once during a rotation).
pub struct Verifier {
    keys: Vec<Key>,
    rules: Rules,
}

impl Verifier {
    pub fn new(keys: Vec<Key>, rules: Rules) -> Self {
        Verifier { keys, rules }
    }

    /// One HS256 secret, no audience or issuer rules.
    pub fn hs256(secret: &[u8], leeway_secs: u64) -> Self {
        Verifier::new(
            vec![Key::hs256(secret)],
            Rules {
                leeway_secs,
                ..Rules::default()
            },
        )
    }

    pub fn leeway_secs(&self) -> u64 {
        self.rules.leeway_secs
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.rules.leeway_secs;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.rules.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.rules.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let named: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    return Err(TokenError::UnknownKey);
                }
                named
            }
            None => self.keys.iter().filter(|k| k.kid.is_none()).collect(),
        };
        let mut result = Err(TokenError::WrongAlgorithm);
        for key in candidates.into_iter().filter(|k| k.alg == header.alg) {
            result = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(key.alg))
                .map(|data| data.claims)
                .map_err(map_error);
            if result != Err(TokenError::BadSignature) {
                break; // a key that checks the signature has the last word
            }
        }
        match result {
            Ok(claims)
                if claims.sub.trim().is_empty() || claims.sub.chars().any(char::is_control) =>
            {
                Err(TokenError::EmptySubject)
            }
            other => other,
        }
    }
}

impl crate::delivery::access::Authenticator for Verifier {
    fn authenticate(&self, token: &str) -> Result<Claims, String> {
        self.verify(token).map_err(|e| e.to_string())
    }

    fn leeway_secs(&self) -> u64 {
        self.rules.leeway_secs
    }
}

fn map_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::WrongIssuer,
        _ => TokenError::Malformed,
    }
}

/// Parses `RINGCAST_JWT_PUBLIC_KEYS`: `[kid@]ALG:path` items separated by commas.
pub fn parse_key_list(list: &str) -> Result<Vec<(Option<String>, Algorithm, String)>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (kid, rest) = match item.split_once('@') {
                Some((kid, rest)) => (Some(kid.to_string()), rest),
                None => (None, item),
            };
            let (alg, path) = rest
                .split_once(':')
                .ok_or_else(|| format!("\"{item}\": expected [kid@]ALG:path"))?;
            Ok((kid, parse_alg(alg)?, path.to_string()))
        })
        .collect()
}

pub fn parse_alg(alg: &str) -> Result<Algorithm, String> {
    match alg {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(format!(
            "algorithm \"{other}\" is not supported (RS256 or ES256)"
        )),
    }
}

/// Signs an HS256 token (development mode's ready-made token; tests and tools).
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of a JSON object cannot fail")
}

/// Signs an RS256/ES256 token with a private key in PEM (tests and tools).
pub fn sign_pem(
    alg: Algorithm,
    kid: Option<&str>,
    private_pem: &[u8],
    claims: &serde_json::Value,
) -> Result<String, String> {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem),
        other => return Err(format!("{other:?} is not supported")),
    }
    .map_err(|e| e.to_string())?;
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/keys/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn accepts_a_good_token() {
        let v = Verifier::hs256(b"s3cret", 0);
        let t = sign_hs256(
            b"s3cret",
            &json!({"sub":"u1","exp":now()+60,"projects":["p1"],"roles":["admin"]}),
        );
        let c = v.verify(&t).unwrap();
        assert_eq!(c.sub, "u1");
        assert_eq!(c.projects, vec!["p1"]);
        assert!(c.is_admin());
    }

    #[test]
    fn refuses_an_empty_or_blank_sub() {
        let v = Verifier::hs256(b"s3cret", 0);
        for sub in ["", " ", "\t", "\u{0}", "u\u{7}1"] {
            let t = sign_hs256(b"s3cret", &json!({"sub":sub,"exp":now()+60}));
            assert_eq!(v.verify(&t), Err(TokenError::EmptySubject), "{sub:?}");
        }
    }

    #[test]
    fn refuses_bad_tokens_with_the_reason() {
        let v = Verifier::hs256(b"s3cret", 0);
        let exp = now() + 60;
        assert_eq!(
            v.verify(&sign_hs256(b"other", &json!({"sub":"u","exp":exp}))),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            v.verify(&sign_hs256(b"s3cret", &json!({"sub":"u","exp":now()-120}))),
            Err(TokenError::Expired)
        );
        assert_eq!(
            v.verify(&sign_hs256(
                b"s3cret",
                &json!({"sub":"u","exp":exp,"nbf":now()+600})
            )),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            v.verify(&sign_hs256(b"s3cret", &json!({"exp":exp}))),
            Err(TokenError::Malformed)
        );
        assert_eq!(v.verify("not.a.token"), Err(TokenError::Malformed));
        assert_eq!(v.verify(""), Err(TokenError::Malformed));
        let with_aud = sign_hs256(b"s3cret", &json!({"sub":"u","exp":exp,"aud":"dashboards"}));
        assert_eq!(v.verify(&with_aud).unwrap().sub, "u");
    }

    #[test]
    fn public_keys_by_kid_and_algorithm() {
        let keys = vec![
            Key::public_pem(Some("a".into()), Algorithm::RS256, &fixture("rs-a.pub.pem")).unwrap(),
            Key::public_pem(Some("b".into()), Algorithm::RS256, &fixture("rs-b.pub.pem")).unwrap(),
            Key::public_pem(None, Algorithm::ES256, &fixture("es-a.pub.pem")).unwrap(),
        ];
        let v = Verifier::new(keys, Rules::default());
        let claims = json!({"sub":"u","exp":now()+60});
        let rs_a = sign_pem(Algorithm::RS256, Some("a"), &fixture("rs-a.pem"), &claims).unwrap();
        let rs_b = sign_pem(Algorithm::RS256, Some("b"), &fixture("rs-b.pem"), &claims).unwrap();
        let es = sign_pem(Algorithm::ES256, None, &fixture("es-a.pem"), &claims).unwrap();
        assert_eq!(v.verify(&rs_a).unwrap().sub, "u");
        assert_eq!(v.verify(&rs_b).unwrap().sub, "u");
        assert_eq!(v.verify(&es).unwrap().sub, "u");
        let b_as_a = sign_pem(Algorithm::RS256, Some("a"), &fixture("rs-b.pem"), &claims).unwrap();
        assert_eq!(v.verify(&b_as_a), Err(TokenError::BadSignature));
        let unknown = sign_pem(Algorithm::RS256, Some("z"), &fixture("rs-a.pem"), &claims).unwrap();
        assert_eq!(v.verify(&unknown), Err(TokenError::UnknownKey));
        let no_kid_rs = sign_pem(Algorithm::RS256, None, &fixture("rs-a.pem"), &claims).unwrap();
        assert_eq!(v.verify(&no_kid_rs), Err(TokenError::WrongAlgorithm));
        assert_eq!(
            v.verify(&sign_hs256(b"anything", &claims)),
            Err(TokenError::WrongAlgorithm)
        );
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let rules = Rules {
            leeway_secs: 0,
            audience: Some("dash".into()),
            issuer: Some("auth".into()),
        };
        let v = Verifier::new(vec![Key::hs256(b"k")], rules);
        let exp = now() + 60;
        let ok = sign_hs256(
            b"k",
            &json!({"sub":"u","exp":exp,"aud":"dash","iss":"auth"}),
        );
        assert!(v.verify(&ok).is_ok());
        let cases = [
            (
                json!({"sub":"u","exp":exp,"aud":"other","iss":"auth"}),
                TokenError::WrongAudience,
            ),
            (
                json!({"sub":"u","exp":exp,"iss":"auth"}),
                TokenError::WrongAudience,
            ),
            (
                json!({"sub":"u","exp":exp,"aud":"dash","iss":"evil"}),
                TokenError::WrongIssuer,
            ),
            (
                json!({"sub":"u","exp":exp,"aud":"dash"}),
                TokenError::WrongIssuer,
            ),
        ];
        for (claims, err) in cases {
            assert_eq!(v.verify(&sign_hs256(b"k", &claims)), Err(err), "{claims}");
        }
    }

    #[test]
    fn key_lists() {
        let keys = parse_key_list("k1@RS256:/a.pem, ES256:/b.pem").unwrap();
        assert_eq!(
            keys[0],
            (Some("k1".into()), Algorithm::RS256, "/a.pem".into())
        );
        assert_eq!(keys[1], (None, Algorithm::ES256, "/b.pem".into()));
        assert!(parse_key_list("HS512:/x").is_err());
        assert!(parse_key_list("nonsense").is_err());
    }
}
