//! How fast a job copies and when it will be done, from what it has done (pure).
//!
//! A running job's document keeps a short log of progress samples (bytes copied
//! at a time), one per checkpoint. Throughput is the slope over the last
//! `WINDOW` of samples (a moving window smooths the steps of polled async
//! copies and the bursts of ranged writes); until the samples span
//! `MIN_SPAN` with bytes moving, there is no figure ("estimating"). The ETA is
//! the remaining bytes at that throughput, counted from the newest sample, and
//! is never given while nothing has been copied: a copy that has not started
//! has no observed speed to promise anything from.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use time::OffsetDateTime;

/// Samples a document keeps.
pub(crate) const MAX_SAMPLES: usize = 16;
/// Samples closer than this to the last one are not kept.
pub(crate) const MIN_GAP: Duration = Duration::from_secs(5);
/// The span throughput is measured over, at most.
pub(crate) const WINDOW: Duration = Duration::from_secs(120);
/// The span samples must cover before there is a throughput.
pub(crate) const MIN_SPAN: Duration = Duration::from_secs(20);

/// Bytes copied at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Bytes copied by then, over every replica.
    pub bytes: u64,
}

/// Adds a sample at `at`, unless the last is younger than `MIN_GAP`; keeps
/// the last `MAX_SAMPLES`. A drop in bytes (a replica copied again from the
/// start) starts the log afresh, so a restart is not read as negative speed.
pub fn record(log: &mut Vec<Sample>, at: OffsetDateTime, bytes: u64) {
    if let Some(last) = log.last() {
        if bytes < last.bytes {
            log.clear();
        } else if at - last.at < MIN_GAP {
            return;
        }
    }
    log.push(Sample { at, bytes });
    if log.len() > MAX_SAMPLES {
        log.drain(..log.len() - MAX_SAMPLES);
    }
}

/// Bytes per second over the last `WINDOW` of `log`, if the samples span at
/// least `MIN_SPAN` and bytes moved.
pub fn throughput(log: &[Sample]) -> Option<f64> {
    let newest = log.last()?;
    let oldest = log
        .iter()
        .find(|s| newest.at - s.at <= WINDOW)
        .unwrap_or(newest);
    let span = (newest.at - oldest.at).as_seconds_f64();
    let moved = newest.bytes.saturating_sub(oldest.bytes);
    (span >= MIN_SPAN.as_secs_f64() && moved > 0).then(|| moved as f64 / span)
}

/// When the copying will be done at `rate`, counted from the newest sample;
/// `None` with nothing copied yet or no rate.
pub fn eta(log: &[Sample], total: u64, rate: Option<f64>) -> Option<OffsetDateTime> {
    let newest = log.last()?;
    let rate = rate.filter(|r| *r > 0.0)?;
    if newest.bytes == 0 {
        return None;
    }
    let left = total.saturating_sub(newest.bytes) as f64 / rate;
    Some(newest.at + Duration::from_secs_f64(left.min(1e9)))
}

/// What a person is shown about a job's timing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Since the job started running (to its end, once ended).
    pub elapsed_seconds: Option<u64>,
    /// Observed copy throughput, bytes per second.
    pub throughput_bytes_per_second: Option<u64>,
    /// Seconds until the copying is done, from now.
    pub eta_seconds: Option<u64>,
    /// When the copying will be done.
    #[serde(with = "time::serde::rfc3339::option")]
    pub eta_at: Option<OffsetDateTime>,
    /// Running, copying, and not enough observed yet for a throughput.
    pub estimating: bool,
}

/// The timing of a job from its summary fields, at `now`.
pub fn timing(
    running: bool,
    started_at: Option<OffsetDateTime>,
    ended_at: Option<OffsetDateTime>,
    throughput: Option<f64>,
    eta_at: Option<OffsetDateTime>,
    copying_left: bool,
    now: OffsetDateTime,
) -> Timing {
    let until = if running { Some(now) } else { ended_at };
    let elapsed = started_at
        .zip(until)
        .map(|(s, u)| (u - s).whole_seconds().max(0) as u64);
    let eta_at = eta_at.filter(|_| running && copying_left);
    Timing {
        elapsed_seconds: elapsed,
        throughput_bytes_per_second: throughput.filter(|_| running).map(|r| r as u64),
        eta_seconds: eta_at.map(|e| (e - now).whole_seconds().max(0) as u64),
        eta_at,
        estimating: running && copying_left && throughput.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn samples_are_spaced_bounded_and_restart_on_a_drop() {
        let mut log = Vec::new();
        record(&mut log, t(0), 0);
        record(&mut log, t(2), 10);
        assert_eq!(log.len(), 1, "closer than the gap");
        for i in 1..40 {
            record(&mut log, t(i * 10), i as u64 * 100);
        }
        assert_eq!(log.len(), MAX_SAMPLES);
        assert_eq!(log.last().unwrap().bytes, 3900);
        record(&mut log, t(500), 50);
        assert_eq!(
            log,
            vec![Sample {
                at: t(500),
                bytes: 50
            }]
        );
    }

    #[test]
    fn throughput_needs_a_span_and_movement_and_uses_the_window() {
        let mut log = vec![Sample { at: t(0), bytes: 0 }];
        assert_eq!(throughput(&log), None, "one sample");
        log.push(Sample {
            at: t(10),
            bytes: 1000,
        });
        assert_eq!(throughput(&log), None, "10 s is too short to tell");
        log.push(Sample {
            at: t(20),
            bytes: 2000,
        });
        assert_eq!(throughput(&log), Some(100.0));
        // Old fast samples fall out of the window: the rate follows the present.
        let mut log = vec![
            Sample { at: t(0), bytes: 0 },
            Sample {
                at: t(10),
                bytes: 1_000_000,
            },
        ];
        for i in 1..=20 {
            log.push(Sample {
                at: t(10 + i * 10),
                bytes: 1_000_000 + i as u64 * 500,
            });
        }
        let r = throughput(&log).unwrap();
        assert!((r - 50.0).abs() < 1e-9, "{r}");
        let stalled = vec![
            Sample { at: t(0), bytes: 5 },
            Sample {
                at: t(60),
                bytes: 5,
            },
        ];
        assert_eq!(throughput(&stalled), None, "nothing moved");
    }

    #[test]
    fn eta_counts_from_the_newest_sample_and_never_before_a_byte() {
        let log = vec![
            Sample { at: t(0), bytes: 0 },
            Sample {
                at: t(30),
                bytes: 3000,
            },
        ];
        assert_eq!(eta(&log, 10_000, Some(100.0)), Some(t(100)));
        assert_eq!(eta(&log, 10_000, None), None);
        let none = vec![
            Sample { at: t(0), bytes: 0 },
            Sample {
                at: t(30),
                bytes: 0,
            },
        ];
        assert_eq!(eta(&none, 10_000, Some(100.0)), None, "nothing copied yet");
        let done = vec![Sample {
            at: t(40),
            bytes: 10_000,
        }];
        assert_eq!(eta(&done, 10_000, Some(100.0)), Some(t(40)));
    }

    #[test]
    fn timing_says_estimating_and_keeps_promises_to_running_copies() {
        let started = Some(t(0));
        let est = timing(true, started, None, None, None, true, t(30));
        assert_eq!(est.elapsed_seconds, Some(30));
        assert!(est.estimating);
        assert_eq!(est.eta_seconds, None);
        let going = timing(true, started, None, Some(1e6), Some(t(100)), true, t(40));
        assert_eq!((going.eta_seconds, going.estimating), (Some(60), false));
        assert_eq!(going.throughput_bytes_per_second, Some(1_000_000));
        let late = timing(true, started, None, Some(1e6), Some(t(100)), true, t(130));
        assert_eq!(late.eta_seconds, Some(0), "overdue shows 0, not a negative");
        let ended = timing(
            false,
            started,
            Some(t(90)),
            Some(1e6),
            Some(t(100)),
            true,
            t(500),
        );
        assert_eq!(ended.elapsed_seconds, Some(90));
        assert_eq!(
            (
                ended.eta_seconds,
                ended.throughput_bytes_per_second,
                ended.estimating
            ),
            (None, None, false)
        );
        let queued = timing(false, None, None, None, None, true, t(5));
        assert_eq!(queued.elapsed_seconds, None);
    }
}
