//! ETA for progress events, from the rate the owner core observes.
//!
//! Invariant: only an event published with `compute_eta: true` whose `data` is an object with
//! numeric `current_step` and `total_steps` and no `eta_seconds` of its own is touched; it gains
//! `eta_seconds` once two steps of its key (its `coalesce_key`, else its channel) have been
//! seen. Everything else passes through byte for byte.

use std::collections::HashMap;

/// Most progress keys tracked per owner core; the oldest are forgotten past it.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
pub struct Progress {
    /// key → (ms and step of the first sighting)
    seen: HashMap<String, (u64, f64)>,
}

impl Progress {
    /// Returns new `data` text with `eta_seconds` added, or None to keep `data` as sent.
    pub fn annotate(&mut self, key: &str, data: &str, now_ms: u64) -> Option<String> {
        if !data.trim_start().starts_with('{') {
            return None;
        }
        let mut map: serde_json::Map<String, serde_json::Value> =
            crate::proto::msg::parse_data(data.as_bytes()).ok()?;
        if map.contains_key("eta_seconds") {
            return None;
        }
        let step = map.get("current_step")?.as_f64()?;
        let total = map.get("total_steps")?.as_f64()?;
        if step >= total {
            self.seen.remove(key);
            map.insert("eta_seconds".into(), 0.into());
            return serde_json::to_string(&map).ok();
        }
        let first = match self.seen.get(key) {
            Some(&(at, s)) if s < step && at < now_ms => (at, s),
            Some(&(_, s)) if s < step => return None, // same millisecond: no rate yet
            _ => {
                if self.seen.len() >= MAX_KEYS {
                    self.seen.clear();
                }
                self.seen.insert(key.to_string(), (now_ms, step));
                return None;
            }
        };
        let per_ms = (step - first.1) / (now_ms - first.0) as f64;
        let eta = ((total - step) / per_ms / 1000.0).ceil();
        map.insert("eta_seconds".into(), (eta as u64).into());
        serde_json::to_string(&map).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_from_the_observed_rate() {
        let mut p = Progress::default();
        let at =
            |step: u32| format!(r#"{{"current_step":{step},"total_steps":100,"message":"m"}}"#);
        assert_eq!(
            p.annotate("k", &at(10), 0),
            None,
            "first sighting: no rate yet"
        );
        let out = p.annotate("k", &at(20), 1000).unwrap(); // 10 steps per second
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["eta_seconds"], 8);
        assert_eq!(v["message"], "m");
        let done = p.annotate("k", &at(100), 2000).unwrap();
        assert!(done.contains(r#""eta_seconds":0"#));
    }

    #[test]
    fn everything_else_passes_through() {
        let mut p = Progress::default();
        assert_eq!(p.annotate("k", "[1,2]", 0), None);
        assert_eq!(p.annotate("k", r#"{"current_step":1}"#, 0), None);
        assert_eq!(
            p.annotate(
                "k",
                r#"{"current_step":1,"total_steps":9,"eta_seconds":3}"#,
                0
            ),
            None
        );
        assert_eq!(p.annotate("k", "not json", 0), None);
    }
}
