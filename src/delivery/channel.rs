//! Channel names and which core owns each channel.
//!
//! Invariant: a valid name is 1..=200 bytes of `[A-Za-z0-9_.:@/-]`, so it can travel in URLs,
//! JSON and logs without escaping surprises; `owner_core` is a pure function of the name, so
//! every core agrees on which one sequences a channel without asking.

use std::fmt;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 200;

/// What kind of access rule a channel name falls under (see `access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind<'a> {
    /// `user:X`: only user X (and admins).
    User(&'a str),
    /// `project:X`: only users whose `projects` claim holds X or `*`.
    Project(&'a str),
    /// `system`, `alerts`, `audit`: admins only.
    Admin,
    /// `terminal:X`: any valid token may subscribe, because every message on it carries a
    /// `project_id` (the publish API insists) and reaches only who may see that project.
    Terminal,
    /// Anything else: only by the token's `channels` claim.
    Other,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    Empty,
    TooLong,
    BadCharacter,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelError::Empty => "channel name is empty",
            ChannelError::TooLong => "channel name is longer than 200 bytes",
            ChannelError::BadCharacter => "channel name may only hold A-Z a-z 0-9 _ . : @ / -",
        })
    }
}

/// Most characters of an invalid name that an error frame echoes.
pub const SHOWN_CHARS: usize = 64;

/// A name as error frames echo it: a valid name exactly (clients match on it), an invalid one
/// cut to its first `SHOWN_CHARS` characters and "…", so a huge bad name costs a small answer.
pub fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    if validate(name).is_ok() {
        return name.into();
    }
    match name.char_indices().nth(SHOWN_CHARS) {
        None => name.into(),
        Some((cut, _)) => format!("{}…", &name[..cut]).into(),
    }
}

/// Checks a channel name against the naming rule.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(ChannelError::TooLong);
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ChannelError::BadCharacter)
    }
}

/// Classifies a (valid) channel name for the access rules.
pub fn kind(name: &str) -> ChannelKind<'_> {
    match name {
        "system" | "alerts" | "audit" => ChannelKind::Admin,
        _ => {
            if let Some(user) = name.strip_prefix("user:") {
                ChannelKind::User(user)
            } else if let Some(project) = name.strip_prefix("project:") {
                ChannelKind::Project(project)
            } else if name.starts_with("terminal:") {
                ChannelKind::Terminal
            } else {
                ChannelKind::Other
            }
        }
    }
}

/// The core that assigns seqs for `name` and keeps its replay ring: FNV-1a of the name modulo
/// the number of cores (stable across runs and builds, unlike `std`'s randomized hasher).
pub fn owner_core(name: &str, cores: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % cores.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_frames_show_valid_names_whole_and_cut_long_bad_ones() {
        let valid = "a".repeat(MAX_CHANNEL_BYTES);
        assert_eq!(shown(&valid), valid.as_str());
        assert_eq!(shown("bad name"), "bad name");
        let long = "é".repeat(100 * 1024);
        let cut = shown(&long);
        assert_eq!(cut.chars().count(), SHOWN_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(shown(&"x".repeat(201)), format!("{}…", "x".repeat(64)));
    }

    #[test]
    fn names_follow_the_rule() {
        assert_eq!(validate("project:42"), Ok(()));
        assert_eq!(validate("user:alice@example.com"), Ok(()));
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate("a b"), Err(ChannelError::BadCharacter));
        assert_eq!(validate("task:*"), Err(ChannelError::BadCharacter));
        assert_eq!(validate(&"x".repeat(201)), Err(ChannelError::TooLong));
        assert_eq!(validate(&"x".repeat(200)), Ok(()));
    }

    #[test]
    fn kinds() {
        assert_eq!(kind("user:u1"), ChannelKind::User("u1"));
        assert_eq!(kind("project:p"), ChannelKind::Project("p"));
        assert_eq!(kind("audit"), ChannelKind::Admin);
        assert_eq!(kind("dashboard"), ChannelKind::Other);
        assert_eq!(kind("task:t9"), ChannelKind::Other);
        assert_eq!(kind("terminal:t9"), ChannelKind::Terminal);
    }

    #[test]
    fn owner_is_stable_and_spread() {
        assert_eq!(owner_core("project:1", 1), 0);
        let owners: Vec<usize> = (0..1000)
            .map(|i| owner_core(&format!("c:{i}"), 4))
            .collect();
        for core in 0..4 {
            let n = owners.iter().filter(|&&o| o == core).count();
            assert!(n > 150, "core {core} owns only {n} of 1000 channels");
        }
        assert_eq!(owner_core("project:42", 8), owner_core("project:42", 8));
    }
}
