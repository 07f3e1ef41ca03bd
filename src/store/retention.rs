//! Retention's decisions for one topic, as plain arithmetic over what its segments hold
//! ([`SegmentInfo`]): which whole segments go, oldest first, and whether the segment appends go
//! to is rolled first. The store actor's sweep applies them (see `store/retention.md`).

use super::segment::SegmentInfo;
use sluice_protocol::{Discard, TopicSettings};

/// A topic's limits as the sweep applies them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Messages older than this go (their segment's newest message is).
    pub max_age_ms: Option<u64>,
    /// The oldest segments go while the topic holds more bytes than this.
    pub max_bytes: Option<u64>,
    /// The oldest segments go while the topic holds more messages than this.
    pub max_messages: Option<u64>,
    /// `discard = "acked"` and the topic has groups: every seq up to this is settled by every
    /// group (the lowest acked floor), so segments wholly at or below it go.
    pub acked_floor: Option<u64>,
    /// The segment appends go to is rolled once its first message is this old.
    pub roll_age_ms: u64,
}

impl Limits {
    /// The limits of `settings` (values in force), with the groups' lowest acked floor
    /// (`None`: no group) and the broker's `segment_max_age`.
    pub fn of(settings: &TopicSettings, acked_floor: Option<u64>, segment_max_age_ms: u64) -> Self {
        let max_age_ms = settings.max_age_ms.filter(|v| *v > 0);
        Limits {
            max_age_ms,
            max_bytes: settings.max_bytes.filter(|v| *v > 0),
            max_messages: settings.max_messages.filter(|v| *v > 0),
            acked_floor: acked_floor.filter(|_| settings.discard == Some(Discard::Acked)),
            roll_age_ms: max_age_ms.map_or(segment_max_age_ms, |a| {
                (a / 4).max(1).min(segment_max_age_ms)
            }),
        }
    }
}

/// What to do to one topic now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// Roll the segment appends go to (it holds messages and is old enough, or every message
    /// expired).
    pub roll: bool,
    /// Remove this many of the oldest segments (after the roll, if any: then the segment
    /// rolled is one of them when every message expired).
    pub remove: usize,
    /// Why the first of them goes: `max_age`, `max_bytes`, `max_messages` or `acked`.
    pub why: &'static str,
}

/// The plan for a topic whose segments are `segs` (oldest first; the last one takes the
/// appends), at `now_ms`, removing at most `max_remove` segments.
pub fn plan(segs: &[SegmentInfo], limits: &Limits, now_ms: u64, max_remove: usize) -> Plan {
    let Some(active) = segs.last() else {
        return Plan::default();
    };
    let cutoff = limits.max_age_ms.map(|a| now_ms.saturating_sub(a));
    let expired = |s: &SegmentInfo| match (cutoff, s.last_ms) {
        (Some(c), Some(t)) => s.messages > 0 && t < c,
        _ => false,
    };
    let mut out = Plan::default();
    // Every message expired: roll to an empty segment (it keeps the head and the group
    // records) and remove every other one.
    let all_expired = active.messages > 0
        && expired(active)
        && segs.iter().all(|s| s.messages == 0 || expired(s));
    // Or its first message is old enough: rolled, so that all of it can go later.
    let old_enough = active.messages > 0
        && active
            .first_ms
            .is_some_and(|t| now_ms.saturating_sub(t) >= limits.roll_age_ms);
    out.roll = all_expired || old_enough;
    // Candidates: every segment but the one taking appends (which is the rolled one's
    // successor when every message expired).
    let candidates = if all_expired {
        segs.len()
    } else {
        segs.len() - 1
    };
    let mut bytes: u64 = segs.iter().map(|s| s.bytes).sum();
    let mut messages: u64 = segs.iter().map(|s| s.messages).sum();
    for s in &segs[..candidates.min(max_remove)] {
        let why = if expired(s) {
            "max_age"
        } else if limits.max_bytes.is_some_and(|m| bytes > m) {
            "max_bytes"
        } else if limits.max_messages.is_some_and(|m| messages > m) {
            "max_messages"
        } else if limits.acked_floor.is_some_and(|f| s.last_seq() <= f) {
            "acked"
        } else {
            break;
        };
        if out.remove == 0 {
            out.why = why;
        }
        out.remove += 1;
        bytes -= s.bytes;
        messages -= s.messages;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments of 100 messages and 1000 bytes each, the i-th stored at `times[i]` (first and
    /// last message), the last one `active` messages.
    fn segs(times: &[u64], active: u64) -> Vec<SegmentInfo> {
        let n = times.len();
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let messages = if i + 1 == n { active } else { 100 };
                SegmentInfo {
                    first_seq: 1 + 100 * i as u64,
                    messages,
                    bytes: messages * 10,
                    first_ms: (messages > 0).then_some(t),
                    last_ms: (messages > 0).then_some(t + 10),
                }
            })
            .collect()
    }

    fn age(ms: u64) -> Limits {
        Limits {
            max_age_ms: Some(ms),
            roll_age_ms: ms / 4,
            ..Default::default()
        }
    }

    #[test]
    fn by_age_the_old_segments_go_and_the_active_one_rolls() {
        let s = segs(&[0, 1000, 5000], 50);
        let p = plan(&s, &age(2000), 5100, 100);
        assert_eq!(
            p,
            Plan {
                roll: false,
                remove: 2,
                why: "max_age"
            }
        );
        // Every message expired: roll, and all of them go.
        let p = plan(&s, &age(2000), 9000, 100);
        assert_eq!(
            p,
            Plan {
                roll: true,
                remove: 3,
                why: "max_age"
            }
        );
        // Quiet and older than max_age / 4: rolled so it can go later.
        let p = plan(&segs(&[5000], 50), &age(2000), 5600, 100);
        assert_eq!(
            p,
            Plan {
                roll: true,
                remove: 0,
                why: ""
            }
        );
        // An empty active segment is not rolled; every older one expired goes.
        let p = plan(&segs(&[0, 1000, 9000], 0), &age(2000), 9000, 100);
        assert_eq!((p.roll, p.remove), (false, 2));
        assert_eq!(plan(&s, &age(2000), 9000, 1).remove, 1, "bounded per tick");
    }

    #[test]
    fn by_size_and_count_the_oldest_go_while_over() {
        let s = segs(&[0, 0, 0, 0], 100);
        let bytes = Limits {
            max_bytes: Some(2500),
            roll_age_ms: u64::MAX,
            ..Default::default()
        };
        // 4000 bytes: two go (3000 > 2500, then 2000 is under).
        assert_eq!(plan(&s, &bytes, 0, 100).remove, 2);
        let count = Limits {
            max_messages: Some(100),
            roll_age_ms: u64::MAX,
            ..Default::default()
        };
        // Never the active segment.
        assert_eq!(plan(&s, &count, 0, 100).remove, 3);
    }

    #[test]
    fn acked_goes_only_below_every_groups_floor() {
        let s = segs(&[0, 0, 0, 0], 100);
        let acked = |f| Limits {
            acked_floor: Some(f),
            roll_age_ms: u64::MAX,
            ..Default::default()
        };
        assert_eq!(plan(&s, &acked(199), 0, 100).remove, 1);
        assert_eq!(plan(&s, &acked(200), 0, 100).remove, 2);
        assert_eq!(
            plan(&s, &acked(400), 0, 100).remove,
            3,
            "not the active one"
        );
        let settings = TopicSettings {
            discard: Some(Discard::Acked),
            ..Default::default()
        };
        assert_eq!(
            Limits::of(&settings, None, 1000).acked_floor,
            None,
            "no group"
        );
        assert_eq!(
            Limits::of(&TopicSettings::default(), Some(5), 1000).acked_floor,
            None,
            "discard age"
        );
    }
}
