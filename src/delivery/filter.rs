//! Per-connection filters: `agent_ids`, `project_ids`, `event_types`.
//!
//! Invariant: a filter only narrows what permissions already allow. Each list that is set
//! constrains the messages that carry that field (`agent_id`, `project_id`; every message has an
//! `event`); a message without the field is not held back by that list. Lists hold at most
//! `MAX_IDS` ids of at most `MAX_ID_BYTES` bytes each.

/// Most ids in one filter list.
pub const MAX_IDS: usize = 50;
/// Longest id accepted.
pub const MAX_ID_BYTES: usize = 128;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub agent_ids: Vec<Box<str>>,
    pub project_ids: Vec<Box<str>>,
    pub event_types: Vec<Box<str>>,
}

/// A bad filter list: which one and why (answered as HTTP 400 or an `error` frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.agent_ids.is_empty() && self.project_ids.is_empty() && self.event_types.is_empty()
    }

    /// Does a message with these fields pass?
    pub fn passes(&self, agent_id: Option<&str>, project_id: Option<&str>, event: &str) -> bool {
        let holds = |list: &[Box<str>], value: Option<&str>| {
            list.is_empty() || value.is_none_or(|v| list.iter().any(|x| &**x == v))
        };
        holds(&self.agent_ids, agent_id)
            && holds(&self.project_ids, project_id)
            && holds(&self.event_types, Some(event))
    }
}

/// Checks one list (from a query parameter or a `filter` message).
pub fn parse_list<'a>(
    field: &'static str,
    items: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Box<str>>, FilterError> {
    let fail = |reason: String| Err(FilterError { field, reason });
    let mut out: Vec<Box<str>> = Vec::new();
    for item in items {
        if item.is_empty() {
            return fail("empty id".into());
        }
        if item.len() > MAX_ID_BYTES {
            return fail(format!("an id is longer than {MAX_ID_BYTES} bytes"));
        }
        let ok = item.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
        });
        if !ok {
            let shown: String = item.chars().take(32).collect();
            return fail(format!("\"{shown}\" may only hold A-Z a-z 0-9 _ . : @ / -"));
        }
        if !out.iter().any(|x| &**x == item) {
            out.push(item.into());
        }
        if out.len() > MAX_IDS {
            return fail(format!("at most {MAX_IDS} ids"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(agents: &[&str], projects: &[&str], events: &[&str]) -> Filter {
        Filter {
            agent_ids: parse_list("agent_ids", agents.iter().copied()).unwrap(),
            project_ids: parse_list("project_ids", projects.iter().copied()).unwrap(),
            event_types: parse_list("event_types", events.iter().copied()).unwrap(),
        }
    }

    #[test]
    fn an_empty_filter_passes_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(f.passes(Some("a"), Some("p"), "e"));
        assert!(f.passes(None, None, "e"));
    }

    #[test]
    fn each_list_narrows_messages_carrying_its_field() {
        let f = filter(&["a1", "a2"], &[], &["agent:status"]);
        assert!(f.passes(Some("a1"), None, "agent:status"));
        assert!(!f.passes(Some("a3"), None, "agent:status"));
        assert!(!f.passes(Some("a1"), None, "task:created"));
        assert!(
            f.passes(None, Some("p9"), "agent:status"),
            "no agent_id: not held back"
        );
        let p = filter(&[], &["p1"], &[]);
        assert!(p.passes(None, Some("p1"), "x"));
        assert!(!p.passes(None, Some("p2"), "x"));
    }

    #[test]
    fn bad_lists_name_the_field() {
        let many: Vec<String> = (0..51).map(|i| format!("a{i}")).collect();
        let err = parse_list("agent_ids", many.iter().map(String::as_str)).unwrap_err();
        assert_eq!(err.field, "agent_ids");
        assert!(err.reason.contains("at most 50"));
        assert!(parse_list("event_types", ["task:created", ""]).is_err());
        assert!(parse_list("project_ids", ["p 1"]).is_err());
        assert_eq!(parse_list("agent_ids", ["a", "a", "b"]).unwrap().len(), 2);
        let fifty: Vec<String> = (0..50).map(|i| format!("a{i}")).collect();
        assert!(parse_list("agent_ids", fifty.iter().map(String::as_str)).is_ok());
    }
}
