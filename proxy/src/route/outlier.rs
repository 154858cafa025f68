//! Outlier detection for one cluster, as a pure state machine (Envoy's consecutive-5xx and
//! consecutive-gateway-error detectors as Istio configures them): outcomes are recorded per
//! endpoint, an endpoint is ejected after N consecutive errors, stays out `baseEjectionTime ×
//! times ejected` (capped like Envoy's `max_ejection_time`), and returns only on an interval
//! tick. The clock is an argument (`now`), so tests drive time by hand.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use trellis_config::traffic::OutlierDetection;

use super::retry::Outcome;

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default)]
struct HostState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// How many times ejected; decays by one per tick while the host is healthy.
    times_ejected: u32,
    ejected_until: Option<Instant>,
}

/// What recording an outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// The endpoint was ejected until the given instant (it returns on the first tick after).
    Ejected {
        until: Instant,
    },
    /// The threshold was reached but `maxEjectionPercent` forbids another ejection.
    EjectionRefused,
}

#[derive(Debug, Clone)]
pub struct OutlierTracker {
    config: OutlierDetection,
    hosts: HashMap<IpAddr, HostState>,
}

impl OutlierTracker {
    pub fn new(config: OutlierDetection, hosts: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut tracker = Self {
            config,
            hosts: HashMap::new(),
        };
        tracker.sync(hosts);
        tracker
    }

    /// Follows the cluster's endpoint set: new endpoints start healthy, gone ones are forgotten.
    pub fn sync(&mut self, hosts: impl IntoIterator<Item = IpAddr>) {
        let mut next = HashMap::new();
        for host in hosts {
            let state = self.hosts.remove(&host).unwrap_or_default();
            next.insert(host, state);
        }
        self.hosts = next;
    }

    /// How often [`tick`](Self::tick) should run.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.config.interval_ms)
    }

    pub fn record(&mut self, host: IpAddr, outcome: Outcome, now: Instant) -> Recorded {
        let ejected_now = self.ejected_count();
        let total = self.hosts.len();
        let config = &self.config;
        let Some(state) = self.hosts.get_mut(&host) else {
            return Recorded::Counted;
        };
        if state.ejected_until.is_some() {
            return Recorded::Counted;
        }
        // Without split local/external errors (Istio's default), Envoy counts a connect failure,
        // reset or timeout as a 503: both a 5xx and a gateway error.
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(code) => ((500..=599).contains(&code), matches!(code, 502..=504)),
            Outcome::ConnectFailure
            | Outcome::Reset
            | Outcome::RefusedStream
            | Outcome::PerTryTimeout => (true, true),
            // A gRPC error arrives in a 200 response: not an HTTP error for outlier detection.
            Outcome::GrpcStatus(_) => (false, false),
        };
        state.consecutive_5xx = if is_5xx { state.consecutive_5xx + 1 } else { 0 };
        state.consecutive_gateway = if is_gateway {
            state.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        if !tripped(state.consecutive_5xx, config.consecutive_5xx_errors)
            && !tripped(state.consecutive_gateway, config.consecutive_gateway_errors)
        {
            return Recorded::Counted;
        }
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        // Envoy always allows one ejection, then holds ejections to maxEjectionPercent.
        let allowed = ejected_now == 0
            || (ejected_now + 1) * 100 <= total * config.max_ejection_percent as usize;
        if !allowed {
            return Recorded::EjectionRefused;
        }
        state.times_ejected += 1;
        let base = Duration::from_millis(config.base_ejection_time_ms);
        let cap = MAX_EJECTION_TIME.max(base);
        let until = now + base.saturating_mul(state.times_ejected).min(cap);
        state.ejected_until = Some(until);
        Recorded::Ejected { until }
    }

    /// The interval sweep: returns endpoints whose ejection has run out (they are healthy
    /// again) and lets the ejection multiplier of healthy endpoints decay.
    pub fn tick(&mut self, now: Instant) -> Vec<IpAddr> {
        let mut returned = Vec::new();
        for (host, state) in &mut self.hosts {
            match state.ejected_until {
                Some(until) if until <= now => {
                    state.ejected_until = None;
                    returned.push(*host);
                }
                Some(_) => {}
                None => state.times_ejected = state.times_ejected.saturating_sub(1),
            }
        }
        returned.sort();
        returned
    }

    pub fn is_ejected(&self, host: IpAddr) -> bool {
        self.hosts
            .get(&host)
            .is_some_and(|s| s.ejected_until.is_some())
    }

    fn ejected_count(&self) -> usize {
        self.hosts
            .values()
            .filter(|s| s.ejected_until.is_some())
            .count()
    }

    /// Whether ejections apply to load balancing now. Below `minHealthPercent` healthy
    /// endpoints, Istio disables outlier detection and balances over all of them (Envoy's
    /// panic threshold).
    pub fn ejections_apply(&self) -> bool {
        let total = self.hosts.len();
        if total == 0 {
            return false;
        }
        let healthy = total - self.ejected_count();
        healthy * 100 >= total * self.config.min_health_percent as usize
    }

    /// The predicate for [`super::balance::candidates`]: ejected and ejections apply.
    pub fn excludes(&self, host: IpAddr) -> bool {
        self.ejections_apply() && self.is_ejected(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    fn config(
        consecutive_5xx: u32,
        gateway: u32,
        max_percent: u32,
        min_health: u32,
    ) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: consecutive_5xx,
            consecutive_gateway_errors: gateway,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: max_percent,
            min_health_percent: min_health,
        }
    }

    #[test]
    fn consecutive_errors_eject_and_successes_reset_the_count() {
        let t0 = Instant::now();
        let h = hosts(10);
        // (detector config, outcomes, ejected after them)
        let cases: Vec<(OutlierDetection, Vec<Outcome>, bool)> = vec![
            (config(3, 0, 100, 0), vec![Outcome::Status(500); 3], true),
            (config(3, 0, 100, 0), vec![Outcome::Status(500); 2], false),
            (
                config(3, 0, 100, 0),
                vec![
                    Outcome::Status(500),
                    Outcome::Status(500),
                    Outcome::Status(200),
                    Outcome::Status(500),
                ],
                false,
            ),
            (
                config(3, 0, 100, 0),
                vec![
                    Outcome::ConnectFailure,
                    Outcome::Reset,
                    Outcome::PerTryTimeout,
                ],
                true,
            ),
            (
                config(3, 0, 100, 0),
                vec![Outcome::GrpcStatus(14); 3],
                false,
            ),
            (
                config(0, 2, 100, 0),
                vec![Outcome::Status(502), Outcome::Status(504)],
                true,
            ),
            (
                config(0, 2, 100, 0),
                vec![Outcome::Status(500), Outcome::Status(500)],
                false,
            ),
            (
                config(0, 2, 100, 0),
                vec![
                    Outcome::Status(503),
                    Outcome::Status(500),
                    Outcome::Status(503),
                ],
                false,
            ),
            (config(0, 0, 100, 0), vec![Outcome::Status(500); 50], false),
        ];
        for (cfg, outcomes, ejected) in cases {
            let mut tracker = OutlierTracker::new(cfg.clone(), h.clone());
            for outcome in &outcomes {
                tracker.record(h[0], *outcome, t0);
            }
            assert_eq!(tracker.is_ejected(h[0]), ejected, "{cfg:?} {outcomes:?}");
            assert!(!tracker.is_ejected(h[1]));
        }
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_ends_on_a_tick() {
        let t0 = Instant::now();
        let h = hosts(10);
        let mut tracker = OutlierTracker::new(config(1, 0, 100, 0), h.clone());
        let second = Duration::from_secs(1);
        assert_eq!(
            tracker.record(h[0], Outcome::Status(500), t0),
            Recorded::Ejected {
                until: t0 + 30 * second
            }
        );
        // Outcomes of an ejected host (requests already in flight) change nothing.
        assert_eq!(
            tracker.record(h[0], Outcome::Status(500), t0),
            Recorded::Counted
        );
        assert_eq!(tracker.tick(t0 + 29 * second), Vec::<IpAddr>::new());
        assert!(tracker.is_ejected(h[0]));
        // Time alone does not return it: only the interval sweep does.
        assert!(tracker.is_ejected(h[0]));
        assert_eq!(tracker.tick(t0 + 30 * second), vec![h[0]]);
        assert!(!tracker.is_ejected(h[0]));
        // Ejected again at once: twice the base time.
        let t1 = t0 + 31 * second;
        assert_eq!(
            tracker.record(h[0], Outcome::Status(503), t1),
            Recorded::Ejected {
                until: t1 + 60 * second
            }
        );
        tracker.tick(t1 + 60 * second);
        // Healthy ticks let the multiplier decay: after two ticks the next ejection is 30 s again.
        tracker.tick(t1 + 70 * second);
        tracker.tick(t1 + 80 * second);
        let t2 = t1 + 81 * second;
        assert_eq!(
            tracker.record(h[0], Outcome::Status(503), t2),
            Recorded::Ejected {
                until: t2 + 30 * second
            }
        );
        assert_eq!(tracker.interval(), Duration::from_secs(10));
    }

    #[test]
    fn ejection_time_is_capped() {
        let t0 = Instant::now();
        let h = hosts(1);
        let mut tracker = OutlierTracker::new(config(1, 0, 100, 0), h.clone());
        let mut now = t0;
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            if let Recorded::Ejected { until } = tracker.record(h[0], Outcome::Status(500), now) {
                last = until - now;
                now = until;
                tracker.tick(now);
            }
        }
        assert_eq!(last, MAX_EJECTION_TIME);
    }

    #[test]
    fn max_ejection_percent_and_min_health_percent() {
        let t0 = Instant::now();
        let h = hosts(10);
        // 20 % of 10 hosts: two ejections, the third refused.
        let mut tracker = OutlierTracker::new(config(1, 0, 20, 0), h.clone());
        let results: Vec<Recorded> = h[..3]
            .iter()
            .map(|host| tracker.record(*host, Outcome::Status(500), t0))
            .collect();
        assert!(matches!(results[0], Recorded::Ejected { .. }));
        assert!(matches!(results[1], Recorded::Ejected { .. }));
        assert_eq!(results[2], Recorded::EjectionRefused);
        // A percentage below one host still ejects one (Envoy's rule).
        let mut small = OutlierTracker::new(config(1, 0, 10, 0), hosts(3));
        assert!(matches!(
            small.record(hosts(3)[0], Outcome::Status(500), t0),
            Recorded::Ejected { .. }
        ));
        assert_eq!(
            small.record(hosts(3)[1], Outcome::Status(500), t0),
            Recorded::EjectionRefused
        );

        // minHealthPercent 90: with 2 of 10 ejected only 80 % are healthy, so ejections stop
        // applying and every host is balanced over again.
        let mut guarded = OutlierTracker::new(config(1, 0, 100, 90), h.clone());
        guarded.record(h[0], Outcome::Status(500), t0);
        assert!(guarded.ejections_apply() && guarded.excludes(h[0]));
        guarded.record(h[1], Outcome::Status(500), t0);
        assert!(!guarded.ejections_apply());
        assert!(guarded.is_ejected(h[1]) && !guarded.excludes(h[1]));
    }

    #[test]
    fn follows_the_endpoint_set() {
        let t0 = Instant::now();
        let h = hosts(3);
        let mut tracker = OutlierTracker::new(config(1, 0, 100, 0), h.clone());
        tracker.record(h[0], Outcome::Status(500), t0);
        tracker.sync(vec![h[0], h[2], IpAddr::from([10, 0, 0, 9])]);
        assert!(tracker.is_ejected(h[0]), "kept hosts keep their state");
        assert!(!tracker.is_ejected(h[1]));
        assert_eq!(
            tracker.record(h[1], Outcome::Status(500), t0),
            Recorded::Counted,
            "unknown host"
        );
    }
}
