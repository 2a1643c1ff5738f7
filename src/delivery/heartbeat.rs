//! Heartbeat accounting for one connection: when to ping, when to give up.
//!
//! Invariant: at most one ping is outstanding; a ping counts as missed when no pong came within
//! `pong_timeout`; `max_missed` misses in a row end the connection. Any pong clears the count.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_missed: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            max_missed: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Nothing,
    SendPing,
    /// `max_missed` pings in a row went unanswered.
    Dead,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    next_ping: Instant,
    ping_sent: Option<Instant>,
    missed: u32,
    /// When the client last answered a ping (or connected), as `coarse` time: it fits where
    /// the struct had padding.
    last_pong: u32,
}

/// A time to the second in 4 bytes: seconds since the process first asked (for what a
/// connection keeps for the registry and the admin API, not for deadlines).
pub fn coarse(t: Instant) -> u32 {
    let secs = t.saturating_duration_since(coarse_base()).as_secs();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// The `Instant` of a `coarse` time.
pub fn from_coarse(secs: u32) -> Instant {
    coarse_base() + Duration::from_secs(secs.into())
}

fn coarse_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Heartbeat {
    pub fn new(now: Instant, cfg: &HeartbeatConfig) -> Self {
        Heartbeat {
            next_ping: now + cfg.ping_interval,
            ping_sent: None,
            missed: 0,
            last_pong: coarse(now),
        }
    }

    pub fn handle_pong(&mut self, now: Instant) {
        self.ping_sent = None;
        self.missed = 0;
        self.last_pong = coarse(now);
    }

    /// When the client last answered a ping (its connect time until then), to the second.
    pub fn last_pong(&self) -> Instant {
        from_coarse(self.last_pong)
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant, cfg: &HeartbeatConfig) -> Beat {
        if let Some(sent) = self.ping_sent {
            if now.duration_since(sent) >= cfg.pong_timeout {
                self.ping_sent = None;
                self.missed += 1;
                if self.missed >= cfg.max_missed {
                    return Beat::Dead;
                }
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + cfg.ping_interval;
            if self.ping_sent.is_none() {
                self.ping_sent = Some(now);
            }
            return Beat::SendPing;
        }
        Beat::Nothing
    }

    pub fn missed(&self) -> u32 {
        self.missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HeartbeatConfig {
        HeartbeatConfig {
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            max_missed: 3,
        }
    }

    #[test]
    fn three_missed_pongs_in_a_row_are_fatal() {
        let cfg = cfg();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut hb = Heartbeat::new(t0, &cfg);
        assert_eq!(hb.poll(t0 + s(29), &cfg), Beat::Nothing);
        assert_eq!(hb.poll(t0 + s(30), &cfg), Beat::SendPing);
        assert_eq!(hb.poll(t0 + s(40), &cfg), Beat::Nothing);
        assert_eq!(hb.missed(), 1);
        assert_eq!(hb.poll(t0 + s(60), &cfg), Beat::SendPing);
        assert_eq!(hb.poll(t0 + s(70), &cfg), Beat::Nothing);
        assert_eq!(hb.poll(t0 + s(90), &cfg), Beat::SendPing);
        assert_eq!(hb.poll(t0 + s(99), &cfg), Beat::Nothing);
        assert_eq!(hb.poll(t0 + s(100), &cfg), Beat::Dead);
    }

    #[test]
    fn a_pong_clears_the_count() {
        let cfg = cfg();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut hb = Heartbeat::new(t0, &cfg);
        for round in 1..=10u64 {
            assert_eq!(hb.poll(t0 + s(30 * round), &cfg), Beat::SendPing);
            if round % 2 == 0 {
                hb.handle_pong(t0);
            }
            assert_ne!(hb.poll(t0 + s(30 * round + 10), &cfg), Beat::Dead);
        }
    }
}
