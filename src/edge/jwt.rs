//! Token checking at the edge: HS256 JWTs → `Claims`.
//!
//! Invariant: a connection exists only with claims from a token whose signature and `exp`
//! checked out; the reason a token failed is logged and answered, the token itself never is.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use crate::delivery::access::Claims;

/// Why a token was refused (answered as HTTP 401 with this text).
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
}

/// Checks HS256 tokens with one shared secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &[u8], leeway_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_nbf = true;
        // No audience is configured in this version: accept tokens whether or not they
        // name one (jsonwebtoken would otherwise refuse every token carrying `aud`).
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                _ => TokenError::Malformed,
            })
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
}
