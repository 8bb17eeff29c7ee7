//! When to poll a pending copy next: soon when it is about to finish, rarely when it
//! is slow, bounded both ways. Status requests are billed and count against the
//! account's request rate, so a tight fixed loop is waste.

use std::time::Duration;

/// The wait before the next status request of a pending copy.
///
/// `copied_delta` bytes arrived in `elapsed` since the last poll and `remaining`
/// are still to come. With progress, aim at half the estimated time to finish;
/// without, back off by doubling `previous`.
pub(crate) fn next_poll(
    previous: Duration,
    copied_delta: u64,
    elapsed: Duration,
    remaining: u64,
    min: Duration,
    max: Duration,
) -> Duration {
    let next = if copied_delta > 0 && !elapsed.is_zero() {
        let rate = copied_delta as f64 / elapsed.as_secs_f64();
        let eta = remaining as f64 / rate;
        Duration::from_secs_f64((eta / 2.0).min(max.as_secs_f64()))
    } else {
        previous.saturating_mul(2)
    };
    next.clamp(min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn follows_the_estimated_time_to_finish() {
        // 10 MB/s with 100 MB left: about 10 s to go, poll in 5 s.
        let d = next_poll(
            MIN,
            10_000_000,
            Duration::from_secs(1),
            100_000_000,
            MIN,
            MAX,
        );
        assert_eq!(d, Duration::from_secs(5));
        // The same rate seen over 4 s: 40 MB in 4 s, 100 MB left, poll in 5 s.
        let d = next_poll(
            MIN,
            40_000_000,
            Duration::from_secs(4),
            100_000_000,
            MIN,
            MAX,
        );
        assert_eq!(d, Duration::from_secs(5));
        // Nearly done: poll at the minimum.
        let d = next_poll(MIN, 10_000_000, Duration::from_secs(1), 1000, MIN, MAX);
        assert_eq!(d, MIN);
        // Slow and far: poll at the maximum.
        let d = next_poll(MIN, 1, Duration::from_secs(10), u64::MAX / 2, MIN, MAX);
        assert_eq!(d, MAX);
    }

    #[test]
    fn backs_off_without_progress() {
        let mut d = MIN;
        let mut seen = vec![];
        for _ in 0..10 {
            d = next_poll(d, 0, Duration::from_secs(1), 100, MIN, MAX);
            seen.push(d);
        }
        assert_eq!(seen[0], Duration::from_millis(500));
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), MAX);
    }
}
