//! Liveness of a connection: the broker counts any inbound frame as a sign of life, asks a quiet
//! client for one with a KEEPALIVE carrying the RESPOND flag (every RSocket client answers it,
//! rsocket_rust's included, whatever keepalive interval it chose itself), and gives up on a
//! client that sends nothing for the lifetime.

use std::time::{Duration, Instant};

/// What the connection should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Nothing to do.
    Alive,
    /// Send a KEEPALIVE with RESPOND: the client has been quiet for the ping interval.
    Ping,
    /// Nothing was received for longer than the lifetime: close the connection.
    Expired,
}

/// Tracks when the client last sent anything and when the broker last asked it to.
#[derive(Debug, Clone)]
pub struct Keepalive {
    lifetime: Duration,
    ping_every: Duration,
    last_inbound: Instant,
    last_ping: Option<Instant>,
}

impl Keepalive {
    /// `lifetime`: the longest silence tolerated; `keepalive`: the broker's ping interval. The
    /// broker pings after `min(keepalive, lifetime / 2)` of silence (so even a lifetime shorter
    /// than the configured keepalive gets a ping in time), then at that interval.
    pub fn new(lifetime: Duration, keepalive: Duration, now: Instant) -> Self {
        Keepalive {
            lifetime,
            ping_every: keepalive.min(lifetime / 2).max(Duration::from_millis(1)),
            last_inbound: now,
            last_ping: None,
        }
    }

    /// The lifetime in force.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The ping interval in force.
    pub fn ping_every(&self) -> Duration {
        self.ping_every
    }

    /// Changes the lifetime (the client's SETUP may shorten it).
    pub fn set_lifetime(&mut self, lifetime: Duration, keepalive: Duration) {
        *self = Keepalive {
            last_inbound: self.last_inbound,
            ..Keepalive::new(lifetime, keepalive, self.last_inbound)
        };
    }

    /// A frame arrived.
    pub fn saw_inbound(&mut self, now: Instant) {
        self.last_inbound = now;
    }

    /// When a frame last arrived.
    pub fn last_inbound(&self) -> Instant {
        self.last_inbound
    }

    /// How often [`Keepalive::check`] should run: a quarter of the ping interval, within
    /// 50 ms..=5 s.
    pub fn check_every(&self) -> Duration {
        (self.ping_every / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// What to do at `now`. Returns [`Liveness::Ping`] at most once per ping interval.
    pub fn check(&mut self, now: Instant) -> Liveness {
        let quiet = now.saturating_duration_since(self.last_inbound);
        if quiet > self.lifetime {
            return Liveness::Expired;
        }
        if quiet < self.ping_every {
            return Liveness::Alive;
        }
        let due = self
            .last_ping
            .is_none_or(|p| now.saturating_duration_since(p) >= self.ping_every);
        if due {
            self.last_ping = Some(now);
            Liveness::Ping
        } else {
            Liveness::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn pings_a_quiet_client_once_per_interval_and_expires_after_the_lifetime() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(3 * S, S, t0);
        assert_eq!(k.check(t0 + S / 2), Liveness::Alive);
        assert_eq!(k.check(t0 + S), Liveness::Ping);
        assert_eq!(
            k.check(t0 + S + S / 4),
            Liveness::Alive,
            "one ping per interval"
        );
        assert_eq!(k.check(t0 + 2 * S), Liveness::Ping);
        assert_eq!(k.check(t0 + 3 * S), Liveness::Ping);
        assert_eq!(k.check(t0 + 3 * S + S / 10), Liveness::Expired);
    }

    #[test]
    fn any_inbound_frame_resets_the_silence() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(3 * S, S, t0);
        assert_eq!(k.check(t0 + S), Liveness::Ping);
        k.saw_inbound(t0 + S + S / 100); // the echo
        assert_eq!(k.check(t0 + 2 * S), Liveness::Alive);
        for i in 2..100 {
            k.saw_inbound(t0 + i * S);
            assert_ne!(k.check(t0 + i * S + S / 2), Liveness::Expired);
        }
    }

    #[test]
    fn a_lifetime_shorter_than_the_keepalive_still_gets_pinged_in_time() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(S, 20 * S, t0);
        assert_eq!(k.ping_every(), S / 2);
        assert_eq!(k.check(t0 + S / 2), Liveness::Ping);
        k.set_lifetime(10 * S, 2 * S);
        assert_eq!(k.ping_every(), 2 * S);
        assert_eq!(k.check(t0 + S), Liveness::Alive);
        assert_eq!(k.check_every(), S / 2);
    }
}
