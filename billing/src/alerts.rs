//! What the worker notices for `alert.events` ([`aigw_common::events::AlertEvent`]): a token's
//! quota crossing 10 % remaining and 0 %, and a channel's success rate falling below 95 % (and
//! recovering). Pure: the worker feeds it what each batch settled and billed, and sends what it
//! returns.
//!
//! Quota crossings are exact: the settle script returns, atomically, how much it added and the
//! counter after, so `before = after - added` is the value before this batch's events; a retried
//! batch adds nothing (its events are marked settled) and so crosses nothing twice, and the
//! worker keeps what the first attempt found for the retries (`worker::BatchState`). A crash
//! between settling and sending loses that crossing (alerts are notifications; the bill is exact
//! either way). A counter Redis lost (re-seeded from MySQL) is not judged in that batch.
//!
//! Channel health is judged per worker on the events it bills ([`channel_failed`]), in one-minute
//! buckets over the last five minutes, once a channel has at least [`MIN_REQUESTS`] there; each worker sees its
//! partitions' share, so with several workers a channel can be reported by more than one of them
//! (the record id names the minute, so consumers can dedupe).

use std::collections::{BTreeMap, HashMap};

use aigw_common::events::AlertKind;

/// The quota alert fires when no more than this fraction (1/10) remains.
pub const LOW_REMAINING_DIVISOR: i64 = 10;

/// The success rate below which a channel is degraded: 95 / 100.
pub const SUCCESS_PERCENT: u64 = 95;

/// Fewest requests in the window before a channel is judged.
pub const MIN_REQUESTS: u64 = 20;

/// Minutes in the window.
pub const WINDOW_MINUTES: i64 = 5;

/// Whether a billed request counts against its channel: the upstream failed it — no answer, a
/// 5xx, or 429 (the provider's own limit on our key). A client's bad request (another 4xx) and a
/// cut stream (which a client's abort also causes) are not the channel's fault, so no tenant can
/// make a shared channel look degraded with its own requests.
pub fn channel_failed(outcome: aigw_plugin_core::Outcome, status: u16) -> bool {
    outcome == aigw_plugin_core::Outcome::UpstreamError
        && (status == 0 || status == 429 || status >= 500)
}

/// The quota alerts `added` units took a token across, going from `after - added` to `after`.
/// A negative quota is unlimited.
pub fn quota_crossings(quota: i64, added: i64, after: i64) -> Vec<AlertKind> {
    if quota <= 0 || added <= 0 {
        return Vec::new();
    }
    let before = after - added;
    // "10 % or less remaining": used ≥ quota − ⌊quota / 10⌋.
    let low = quota - quota / LOW_REMAINING_DIVISOR;
    let mut out = Vec::new();
    if before < low && after >= low && after < quota {
        out.push(AlertKind::QuotaLow);
    }
    if before < quota && after >= quota {
        out.push(AlertKind::QuotaExhausted);
    }
    out
}

#[derive(Debug, Default)]
struct Channel {
    /// Minute → (requests, failures).
    buckets: BTreeMap<i64, (u64, u64)>,
    degraded: bool,
}

/// A change of a channel's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelChange {
    pub channel: String,
    pub kind: AlertKind,
    pub minute: i64,
    pub requests: u64,
    pub failures: u64,
}

/// Per-channel success over the last [`WINDOW_MINUTES`] minutes of event time.
#[derive(Debug, Default)]
pub struct ChannelHealth {
    channels: HashMap<String, Channel>,
}

impl ChannelHealth {
    /// Counts one billed request of `channel` that ended at `ended_at_ms`.
    pub fn record(&mut self, channel: &str, ended_at_ms: i64, failed: bool) {
        let minute = ended_at_ms.div_euclid(60_000);
        let c = self.channels.entry(channel.to_owned()).or_default();
        let b = c.buckets.entry(minute).or_default();
        b.0 += 1;
        b.1 += u64::from(failed);
    }

    /// Judges every channel on its window (ending at its newest minute) and returns the channels
    /// whose state changed.
    pub fn evaluate(&mut self) -> Vec<ChannelChange> {
        let mut out = Vec::new();
        for (name, c) in &mut self.channels {
            let Some(&newest) = c.buckets.keys().next_back() else {
                continue;
            };
            c.buckets.retain(|m, _| *m > newest - WINDOW_MINUTES);
            let (requests, failures) = c
                .buckets
                .values()
                .fold((0, 0), |(r, f), (br, bf)| (r + br, f + bf));
            if requests < MIN_REQUESTS {
                continue;
            }
            let ok = (requests - failures) * 100 >= SUCCESS_PERCENT * requests;
            let kind = match (c.degraded, ok) {
                (false, false) => AlertKind::ChannelDegraded,
                (true, true) => AlertKind::ChannelRecovered,
                _ => continue,
            };
            c.degraded = !ok;
            out.push(ChannelChange {
                channel: name.clone(),
                kind,
                minute: newest,
                requests,
                failures,
            });
        }
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_crossings_fire_once_at_ten_percent_and_at_zero() {
        use AlertKind::{QuotaExhausted, QuotaLow};
        use aigw_plugin_core::Outcome;
        assert!(channel_failed(Outcome::UpstreamError, 502));
        assert!(channel_failed(Outcome::UpstreamError, 0));
        assert!(channel_failed(Outcome::UpstreamError, 429));
        assert!(
            !channel_failed(Outcome::UpstreamError, 400),
            "the client's bad request"
        );
        assert!(!channel_failed(Outcome::Truncated, 200), "a cut stream");
        assert!(!channel_failed(Outcome::Complete, 200));
        // quota 1000: low from 900 used.
        assert_eq!(quota_crossings(1000, 100, 899), vec![]);
        assert_eq!(quota_crossings(1000, 1, 900), vec![QuotaLow]);
        assert_eq!(quota_crossings(1000, 50, 950), vec![], "already low");
        assert_eq!(quota_crossings(1000, 60, 1000), vec![QuotaExhausted]);
        assert_eq!(
            quota_crossings(1000, 500, 1200),
            vec![QuotaExhausted],
            "jumped past both: exhausted says it"
        );
        assert_eq!(quota_crossings(1000, 10, 1210), vec![], "already exhausted");
        assert_eq!(
            quota_crossings(1000, 0, 950),
            vec![],
            "a retried batch adds nothing"
        );
        assert_eq!(quota_crossings(-1, 10, 1_000_000), vec![], "unlimited");
        // Small quotas: 9 → low at 9 - 0 = 9 used, i.e. with the exhaustion itself.
        assert_eq!(quota_crossings(9, 9, 9), vec![QuotaExhausted]);
        assert_eq!(quota_crossings(10, 9, 9), vec![QuotaLow]);
    }

    #[test]
    fn a_channel_degrades_below_95_percent_and_recovers_above() {
        let mut h = ChannelHealth::default();
        let t0 = 1_790_000_000_000;
        // 19 requests, 5 failed: too few to judge.
        for i in 0..19 {
            h.record("openai-main", t0 + i * 1000, i < 5);
        }
        assert_eq!(h.evaluate(), vec![]);
        // The 20th: 15/20 = 75 %.
        h.record("openai-main", t0 + 19_000, false);
        let c = h.evaluate();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].kind, c[0].requests, c[0].failures),
            (AlertKind::ChannelDegraded, 20, 5)
        );
        assert_eq!(h.evaluate(), vec![], "said once");
        // Five minutes later the old failures have left the window: 100 good ones recover it.
        for i in 0..100 {
            h.record("openai-main", t0 + 6 * 60_000 + i, false);
        }
        let c = h.evaluate();
        assert_eq!(
            (c[0].kind, c[0].requests, c[0].failures),
            (AlertKind::ChannelRecovered, 100, 0)
        );
        // Exactly 95 % is healthy; 94 of 100 is not.
        let mut h = ChannelHealth::default();
        for i in 0..100 {
            h.record("c", t0, i < 5);
        }
        assert_eq!(h.evaluate(), vec![]);
        h.record("c", t0, true);
        assert_eq!(h.evaluate()[0].kind, AlertKind::ChannelDegraded);
    }
}
