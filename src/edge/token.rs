//! `ringcast token`: a client token from flags, signed with the configured HS256 secret, for
//! development and scripts.
//!
//! Invariant: a token is printed only when it would be accepted by a server with the same
//! settings: signed with its secret, `sub` non-empty, `aud`/`iss` as it requires them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::edge::config::TokenSettings;

/// The claims of the token to print.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The user id (`sub`), non-empty
    #[arg(long)]
    pub sub: String,
    /// Project ids this user may see, comma-separated; `*` means all
    #[arg(long, value_delimiter = ',', required = true)]
    pub projects: Vec<String>,
    /// Roles, comma-separated; `admin` may read `system`, `alerts` and `audit` [default: none]
    #[arg(long, value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Further channels or `prefix:*` patterns, comma-separated [default: none]
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Lifetime: plain seconds or a number with s, m, h or d (90s, 30m, 1h, 7d)
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
}

/// Why no token was printed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenCommandError {
    #[error(
        "no token secret is configured: set RINGCAST_JWT_SECRET (or jwt_secret in the --config \
         file) to the secret the server uses (a server in development mode picks a random secret \
         per run: use the admin token it prints)"
    )]
    NoSecret,
    #[error(
        "only public keys (RINGCAST_JWT_PUBLIC_KEYS) are configured: signing RS256/ES256 tokens \
         needs the private key, which ringcast does not hold; sign them where the private key \
         lives, or configure RINGCAST_JWT_SECRET for HS256"
    )]
    PublicKeysOnly,
    #[error("--sub must not be empty")]
    EmptySub,
}

/// Builds and signs the token; `now_secs` is the Unix time it is issued at.
pub fn mint(
    settings: &TokenSettings,
    args: &TokenArgs,
    now_secs: u64,
) -> Result<String, TokenCommandError> {
    let secret = match (&settings.jwt_secret, settings.has_public_keys) {
        (Some(secret), _) => secret,
        (None, true) => return Err(TokenCommandError::PublicKeysOnly),
        (None, false) => return Err(TokenCommandError::NoSecret),
    };
    Ok(crate::edge::jwt::sign_hs256(
        secret.as_bytes(),
        &claims(settings, args, now_secs)?,
    ))
}

fn claims(
    settings: &TokenSettings,
    args: &TokenArgs,
    now_secs: u64,
) -> Result<Value, TokenCommandError> {
    if args.sub.trim().is_empty() {
        return Err(TokenCommandError::EmptySub);
    }
    let list = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut claims = json!({
        "sub": args.sub,
        "projects": list(&args.projects),
        "roles": list(&args.roles),
        "iat": now_secs,
        "exp": now_secs.saturating_add(args.ttl.as_secs()),
    });
    if !args.channels.is_empty() {
        claims["channels"] = json!(list(&args.channels));
    }
    if let Some(aud) = &settings.jwt_audience {
        claims["aud"] = json!(aud);
    }
    if let Some(iss) = &settings.jwt_issuer {
        claims["iss"] = json!(iss);
    }
    Ok(claims)
}

/// `90s`, `30m`, `1h`, `7d` or plain seconds; at least one second.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "'{s}': expected seconds or a number with s, m, h or d"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}': expected seconds or a number with s, m, h or d"))?;
    match n.checked_mul(per_unit) {
        Some(0) => Err("the ttl must be at least one second".into()),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("'{s}' is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::jwt::Verifier;

    fn args(sub: &str) -> TokenArgs {
        TokenArgs {
            sub: sub.into(),
            projects: vec!["p1".into(), " p2 ".into()],
            roles: vec![],
            channels: vec![],
            ttl: Duration::from_secs(3600),
        }
    }

    fn with_secret() -> TokenSettings {
        TokenSettings {
            jwt_secret: Some("a-secret-of-16-bytes-or-more".into()),
            has_public_keys: false,
            jwt_audience: None,
            jwt_issuer: None,
        }
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("45"), Ok(Duration::from_secs(45)));
        for bad in [
            "",
            "h",
            "1w",
            "-5",
            "1.5h",
            "0",
            "0s",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_minted_token_verifies_with_the_same_secret() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = mint(&with_secret(), &args("u1"), now).unwrap();
        let claims = Verifier::hs256(b"a-secret-of-16-bytes-or-more", 0)
            .verify(&token)
            .unwrap();
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.projects, ["p1", "p2"]);
        assert_eq!(claims.exp, Some(now + 3600));
    }

    #[test]
    fn audience_and_issuer_are_set_as_configured() {
        let settings = TokenSettings {
            jwt_audience: Some("dashboards".into()),
            jwt_issuer: Some("auth.example".into()),
            ..with_secret()
        };
        let c = claims(&settings, &args("u1"), 100).unwrap();
        assert_eq!(
            (c["aud"].as_str(), c["iss"].as_str()),
            (Some("dashboards"), Some("auth.example"))
        );
        assert!(c.get("channels").is_none());
    }

    #[test]
    fn no_secret_public_keys_only_and_empty_sub_are_refused() {
        let none = TokenSettings {
            jwt_secret: None,
            ..with_secret()
        };
        assert_eq!(
            mint(&none, &args("u1"), 0),
            Err(TokenCommandError::NoSecret)
        );
        let public_only = TokenSettings {
            has_public_keys: true,
            ..none
        };
        assert_eq!(
            mint(&public_only, &args("u1"), 0),
            Err(TokenCommandError::PublicKeysOnly)
        );
        assert_eq!(
            mint(&with_secret(), &args(" "), 0),
            Err(TokenCommandError::EmptySub)
        );
    }
}
