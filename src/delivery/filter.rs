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

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub agent_ids: Vec<Box<str>>,
    pub project_ids: Vec<Box<str>>,
    pub event_types: Vec<Box<str>>,
    /// Log search: only events whose `data` (as JSON text) matches.
    pub text: Option<TextMatch>,
    /// Log levels: only events whose `data.level` is one of these (events without a level pass).
    pub levels: Vec<Box<str>>,
}

/// A substring or a regular expression, matched against an event's `data` as JSON text.
#[derive(Debug, Clone)]
pub enum TextMatch {
    Substring(Box<str>),
    Regex(regex::Regex),
}

/// Longest search text or pattern accepted.
pub const MAX_SEARCH_BYTES: usize = 256;

impl TextMatch {
    pub fn substring(s: &str) -> Result<TextMatch, FilterError> {
        check_search("search", s)?;
        Ok(TextMatch::Substring(s.into()))
    }

    pub fn regex(pattern: &str) -> Result<TextMatch, FilterError> {
        check_search("regex", pattern)?;
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map(TextMatch::Regex)
            .map_err(|e| FilterError {
                field: "regex",
                reason: e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .to_string(),
            })
    }

    /// The text as given (for the `filtered` answer).
    pub fn as_str(&self) -> &str {
        match self {
            TextMatch::Substring(s) => s,
            TextMatch::Regex(r) => r.as_str(),
        }
    }

    fn matches(&self, data: &str) -> bool {
        match self {
            TextMatch::Substring(s) => data.contains(&**s),
            TextMatch::Regex(r) => r.is_match(data),
        }
    }
}

/// A log search from `search` (substring) or `regex`; both at once is an error.
pub fn text_match(
    search: Option<&str>,
    regex: Option<&str>,
) -> Result<Option<TextMatch>, FilterError> {
    match (search, regex) {
        (None, None) => Ok(None),
        (Some(s), None) => TextMatch::substring(s).map(Some),
        (None, Some(r)) => TextMatch::regex(r).map(Some),
        (Some(_), Some(_)) => Err(FilterError {
            field: "search",
            reason: "give search or regex, not both".into(),
        }),
    }
}

fn check_search(field: &'static str, s: &str) -> Result<(), FilterError> {
    if s.is_empty() || s.len() > MAX_SEARCH_BYTES {
        return Err(FilterError {
            field,
            reason: format!("must be 1 to {MAX_SEARCH_BYTES} bytes"),
        });
    }
    Ok(())
}

/// The `"level"` string of a JSON object's top level, found without parsing the whole value.
fn level_of(data: &str) -> Option<&str> {
    let v: serde_json::Value = crate::proto::msg::parse_data(data.as_bytes()).ok()?;
    let level = v.get("level")?.as_str()?;
    // Borrow from `data` rather than the parsed value: find the same text in place.
    data.find(level).map(|at| &data[at..at + level.len()])
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
        self.agent_ids.is_empty()
            && self.project_ids.is_empty()
            && self.event_types.is_empty()
            && self.text.is_none()
            && self.levels.is_empty()
    }

    /// Whether the filter looks into `data` (log search or levels).
    pub fn reads_data(&self) -> bool {
        self.text.is_some() || !self.levels.is_empty()
    }

    /// Does a message with these fields pass? `data` is its `data` as JSON text (only read
    /// when `reads_data`).
    pub fn passes(
        &self,
        agent_id: Option<&str>,
        project_id: Option<&str>,
        event: &str,
        data: &str,
    ) -> bool {
        let holds = |list: &[Box<str>], value: Option<&str>| {
            list.is_empty() || value.is_none_or(|v| list.iter().any(|x| &**x == v))
        };
        holds(&self.agent_ids, agent_id)
            && holds(&self.project_ids, project_id)
            && holds(&self.event_types, Some(event))
            && self.text.as_ref().is_none_or(|t| t.matches(data))
            && (self.levels.is_empty() || holds(&self.levels, level_of(data)))
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
            ..Filter::default()
        }
    }

    #[test]
    fn an_empty_filter_passes_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(f.passes(Some("a"), Some("p"), "e", "{}"));
        assert!(f.passes(None, None, "e", "{}"));
    }

    #[test]
    fn each_list_narrows_messages_carrying_its_field() {
        let f = filter(&["a1", "a2"], &[], &["agent:status"]);
        assert!(f.passes(Some("a1"), None, "agent:status", "{}"));
        assert!(!f.passes(Some("a3"), None, "agent:status", "{}"));
        assert!(!f.passes(Some("a1"), None, "task:created", "{}"));
        assert!(
            f.passes(None, Some("p9"), "agent:status", "{}"),
            "no agent_id: not held back"
        );
        let p = filter(&[], &["p1"], &[]);
        assert!(p.passes(None, Some("p1"), "x", "{}"));
        assert!(!p.passes(None, Some("p2"), "x", "{}"));
    }

    #[test]
    fn log_search_and_levels_look_into_data() {
        let line = r#"{"level":"error","line":"connection refused on :5432"}"#;
        let other = r#"{"level":"info","line":"listening"}"#;
        let f = Filter {
            text: Some(TextMatch::substring("refused").unwrap()),
            ..Filter::default()
        };
        assert!(f.reads_data());
        assert!(f.passes(None, None, "log", line));
        assert!(!f.passes(None, None, "log", other));
        let r = Filter {
            text: Some(TextMatch::regex(r":\d{4}").unwrap()),
            ..Filter::default()
        };
        assert!(r.passes(None, None, "log", line));
        assert!(!r.passes(None, None, "log", other));
        let l = Filter {
            levels: parse_list("levels", ["warn", "error"]).unwrap(),
            ..Filter::default()
        };
        assert!(l.passes(None, None, "log", line));
        assert!(!l.passes(None, None, "log", other));
        assert!(l.passes(None, None, "log", r#"{"line":"no level"}"#));
        assert_eq!(TextMatch::regex("(").unwrap_err().field, "regex");
        assert!(TextMatch::substring("").is_err());
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
