//! Per-account limits shared by every job of an instance: a request-rate limiter
//! (governor, on tokio's clock so simulations run on virtual time) and an adaptive
//! cap on concurrent copies that halves when the account throttles and grows back
//! by one slot per window of successes (AIMD).

use governor::{
    clock::Clock,
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed},
    Quota, RateLimiter,
};
use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::Notify;

/// governor's clock on tokio time: paused tests and simulations see virtual time.
#[derive(Debug, Clone)]
pub(crate) struct TokioClock {
    start: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.start)
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

#[derive(Debug)]
struct GateState {
    max: u32,
    limit: f64,
    active: u32,
}

/// An adaptive concurrency cap for one account.
#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    released: Notify,
}

/// A held copy slot; gives it back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<Gate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.state.lock().expect("gate lock").active -= 1;
        self.gate.released.notify_waiters();
    }
}

impl Gate {
    fn new(max: u32) -> Self {
        Self {
            state: Mutex::new(GateState {
                max: max.max(1),
                limit: max.max(1) as f64,
                active: 0,
            }),
            released: Notify::new(),
        }
    }

    /// Takes a slot if one is free under the current limit.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.state.lock().expect("gate lock");
        if (s.active as f64) < s.limit.floor().max(1.0) {
            s.active += 1;
            Some(Slot { gate: self.clone() })
        } else {
            None
        }
    }

    /// Waits until a slot may be free.
    pub(crate) async fn released(&self) {
        self.released.notified().await
    }

    /// The account throttled: halve the limit (never below one).
    pub(crate) fn on_throttle(&self) {
        let mut s = self.state.lock().expect("gate lock");
        s.limit = (s.limit / 2.0).max(1.0);
    }

    /// A request succeeded: grow the limit by one slot per limit's worth of successes.
    pub(crate) fn on_success(&self) {
        let grew = {
            let mut s = self.state.lock().expect("gate lock");
            let before = s.limit.floor();
            s.limit = (s.limit + 1.0 / s.limit).min(s.max as f64);
            s.limit.floor() > before
        };
        if grew {
            self.released.notify_waiters();
        }
    }

    /// The current limit (whole slots).
    pub(crate) fn limit(&self) -> u32 {
        self.state.lock().expect("gate lock").limit.floor() as u32
    }

    /// Slots in use.
    pub(crate) fn active(&self) -> u32 {
        self.state.lock().expect("gate lock").active
    }
}

/// Rate limiters and copy gates of every account.
#[derive(Debug)]
pub struct AccountLimits {
    rates: HashMap<String, Limiter>,
    gates: HashMap<String, Arc<Gate>>,
    clock: TokioClock,
}

impl AccountLimits {
    /// Limits from `(account, requests per second, concurrent copies)`.
    pub fn new(accounts: impl IntoIterator<Item = (String, u32, u32)>) -> Self {
        let clock = TokioClock::default();
        let mut rates = HashMap::new();
        let mut gates = HashMap::new();
        for (name, rps, copies) in accounts {
            let quota = Quota::per_second(NonZeroU32::new(rps.max(1)).expect("at least 1"));
            rates.insert(
                name.clone(),
                RateLimiter::direct_with_clock(quota, clock.clone()),
            );
            gates.insert(name, Arc::new(Gate::new(copies)));
        }
        Self {
            rates,
            gates,
            clock,
        }
    }

    /// Waits for a request token of `account` (accounts without a limiter pass).
    pub async fn request(&self, account: &str) {
        let Some(limiter) = self.rates.get(account) else {
            return;
        };
        loop {
            match limiter.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                }
            }
        }
    }

    /// The copy gate of `account`.
    pub(crate) fn gate(&self, account: &str) -> Option<Arc<Gate>> {
        self.gates.get(account).cloned()
    }

    /// Tells the account's gate how a request went.
    pub(crate) fn feedback(&self, account: &str, throttled: bool) {
        if let Some(g) = self.gates.get(account) {
            if throttled {
                g.on_throttle();
            } else {
                g.on_success();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aimd_halves_on_throttle_and_grows_back_slowly() {
        let g = Arc::new(Gate::new(16));
        assert_eq!(g.limit(), 16);
        g.on_throttle();
        assert_eq!(g.limit(), 8);
        g.on_throttle();
        g.on_throttle();
        g.on_throttle();
        g.on_throttle();
        assert_eq!(g.limit(), 1, "never below one");
        let mut successes = 0;
        while g.limit() < 4 {
            g.on_success();
            successes += 1;
        }
        // 1 -> 4 takes about 1 + 2 + 3 successes: additive, not multiplicative.
        assert!((5..=8).contains(&successes), "{successes}");
        for _ in 0..10_000 {
            g.on_success();
        }
        assert_eq!(g.limit(), 16, "never above the configured cap");
    }

    #[test]
    fn slots_are_bounded_by_the_limit_and_returned_on_drop() {
        let g = Arc::new(Gate::new(2));
        let a = g.try_acquire().unwrap();
        let _b = g.try_acquire().unwrap();
        assert!(g.try_acquire().is_none());
        drop(a);
        assert!(g.try_acquire().is_some());
        g.on_throttle();
        assert_eq!(g.active(), 1);
        assert!(g.try_acquire().is_none(), "limit 1 with one in use");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_runs_on_tokio_time() {
        let limits = AccountLimits::new([("a".to_owned(), 10, 1)]);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            limits.request("a").await;
        }
        let took = start.elapsed();
        // 10 per second with a burst of 10: 30 requests need about 2 s of virtual time.
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2200),
            "{took:?}"
        );
        limits.request("unlimited").await;
    }

    #[tokio::test]
    async fn waiters_wake_when_a_slot_is_returned_or_the_limit_grows() {
        let g = Arc::new(Gate::new(4));
        g.on_throttle();
        g.on_throttle();
        assert_eq!(g.limit(), 1);
        let slot = g.try_acquire().unwrap();
        assert_eq!(g.active(), 1);
        // A returned slot wakes a waiter.
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.released().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing was released yet");
        drop(slot);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the returned slot")
            .unwrap();
        assert_eq!(g.active(), 0);
        // A success that grows the limit by a whole slot wakes a waiter (1 -> 2)…
        let grow = tokio::spawn({
            let g = g.clone();
            async move { g.released().await }
        });
        tokio::task::yield_now().await;
        g.on_success();
        assert_eq!(g.limit(), 2);
        tokio::time::timeout(Duration::from_secs(5), grow)
            .await
            .expect("woken by the larger limit")
            .unwrap();
        // …one that does not (2 -> 2.5) leaves it waiting.
        let idle = tokio::spawn({
            let g = g.clone();
            async move { g.released().await }
        });
        tokio::task::yield_now().await;
        g.on_success();
        assert_eq!(g.limit(), 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!idle.is_finished(), "no slot came free");
        idle.abort();
    }

    #[test]
    fn each_account_has_its_own_gate_fed_by_its_requests() {
        let limits = AccountLimits::new([("a".to_owned(), 10, 8), ("b".to_owned(), 10, 3)]);
        let (a, b) = (limits.gate("a").unwrap(), limits.gate("b").unwrap());
        assert_eq!((a.limit(), b.limit()), (8, 3));
        assert!(limits.gate("c").is_none());
        limits.feedback("a", true);
        assert_eq!((a.limit(), b.limit()), (4, 3), "only a throttled");
        for _ in 0..4 {
            limits.feedback("a", false);
        }
        assert_eq!(a.limit(), 4, "each success adds 1/limit: 4.92 after four");
        limits.feedback("a", false);
        assert_eq!(a.limit(), 5, "and a whole slot after the fifth");
        limits.feedback("c", true);
        let _held = [a.try_acquire().unwrap(), a.try_acquire().unwrap()];
        assert_eq!(a.active(), 2);
    }
}
