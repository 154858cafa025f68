//! Token buckets that bound the API server work callers of the control-plane endpoint can cause:
//! every certificate request costs a TokenReview round trip before the caller is known, and a
//! config stream the discovery cache cannot confirm costs a read of its pod, so the rate of each
//! is capped per source address and for the whole replica. A refused request learns how long to
//! wait (answered as `429` with `Retry-After`).
//!
//! Kept by hand rather than built on `governor`: a request must take a token from its source's
//! bucket and the global one together or from neither (governor's limiters cannot give a token
//! back, so a request refused by the global limit would still drain its source's bucket), and
//! the per-source map must stay bounded without a sweeper task (`MAX_SOURCES`).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Sources tracked at once. Past this, buckets that have refilled (equivalent to no bucket) are
/// forgotten; if every source is still active, new sources are bounded by the global bucket only.
const MAX_SOURCES: usize = 4096;

/// A sustained rate and the burst allowed on top of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            updated: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.updated = now;
    }

    /// How long until one token is available (zero when one is).
    fn wait(&self, rate: Rate) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / rate.per_second)
        }
    }
}

#[derive(Debug)]
struct Buckets {
    global: Bucket,
    sources: HashMap<IpAddr, Bucket>,
}

/// A global token bucket plus one per source address.
#[derive(Debug)]
pub struct RateLimiter {
    global: Rate,
    per_source: Rate,
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    pub fn new(global: Rate, per_source: Rate) -> Self {
        assert!(
            global.per_second > 0.0 && per_source.per_second > 0.0,
            "a rate limit needs a positive refill rate"
        );
        Self {
            global,
            per_source,
            buckets: Mutex::new(Buckets {
                global: Bucket::full(global, Instant::now()),
                sources: HashMap::new(),
            }),
        }
    }

    /// Takes one token for `source` (from its own bucket and the global one), or says how long
    /// to wait before asking again. A refused request takes nothing.
    pub fn try_acquire(&self, source: Option<IpAddr>) -> Result<(), Duration> {
        self.try_acquire_at(source, Instant::now())
    }

    fn try_acquire_at(&self, source: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock();
        buckets.global.refill(self.global, now);
        if let Some(ip) = source
            && !buckets.sources.contains_key(&ip)
        {
            if buckets.sources.len() >= MAX_SOURCES {
                let per_source = self.per_source;
                buckets.sources.retain(|_, bucket| {
                    bucket.refill(per_source, now);
                    bucket.tokens < f64::from(per_source.burst)
                });
            }
            if buckets.sources.len() < MAX_SOURCES {
                buckets
                    .sources
                    .insert(ip, Bucket::full(self.per_source, now));
            }
        }
        let per_source = self.per_source;
        let source_wait = match source.and_then(|ip| buckets.sources.get_mut(&ip)) {
            Some(bucket) => {
                bucket.refill(per_source, now);
                bucket.wait(per_source)
            }
            None => Duration::ZERO,
        };
        let wait = source_wait.max(buckets.global.wait(self.global));
        if !wait.is_zero() {
            return Err(wait);
        }
        buckets.global.tokens -= 1.0;
        if let Some(bucket) = source.and_then(|ip| buckets.sources.get_mut(&ip)) {
            bucket.tokens -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    fn limiter(global: (f64, u32), per_source: (f64, u32)) -> RateLimiter {
        RateLimiter::new(
            Rate {
                per_second: global.0,
                burst: global.1,
            },
            Rate {
                per_second: per_source.0,
                burst: per_source.1,
            },
        )
    }

    #[test]
    fn a_source_gets_its_burst_then_waits_for_the_refill() {
        let limiter = limiter((100.0, 100), (2.0, 3));
        let start = Instant::now();
        for i in 0..3 {
            assert_eq!(limiter.try_acquire_at(A, start), Ok(()), "request {i}");
        }
        // Empty: one token takes 1/2 s at 2 per second.
        assert_eq!(
            limiter.try_acquire_at(A, start),
            Err(Duration::from_millis(500))
        );
        // Another source is not affected.
        assert_eq!(limiter.try_acquire_at(B, start), Ok(()));
        // After the wait it was told, the source gets exactly one more.
        let later = start + Duration::from_millis(500);
        assert_eq!(limiter.try_acquire_at(A, later), Ok(()));
        assert!(limiter.try_acquire_at(A, later).is_err());
    }

    #[test]
    fn the_global_bucket_bounds_all_sources_together() {
        let limiter = limiter((1.0, 2), (10.0, 10));
        let now = Instant::now();
        assert_eq!(limiter.try_acquire_at(A, now), Ok(()));
        assert_eq!(limiter.try_acquire_at(B, now), Ok(()));
        assert_eq!(
            limiter.try_acquire_at(None, now),
            Err(Duration::from_secs(1))
        );
        assert_eq!(limiter.try_acquire_at(A, now), Err(Duration::from_secs(1)));
        assert_eq!(
            limiter.try_acquire_at(A, now + Duration::from_secs(1)),
            Ok(())
        );
    }

    #[test]
    fn a_refused_request_takes_no_token() {
        // The global bucket refuses; A's own bucket must keep its tokens.
        let limiter = limiter((1.0, 1), (1.0, 2));
        let now = Instant::now();
        assert_eq!(limiter.try_acquire_at(B, now), Ok(()));
        for _ in 0..5 {
            assert!(limiter.try_acquire_at(A, now).is_err());
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(limiter.try_acquire_at(A, later), Ok(()));
        let buckets = limiter.buckets.lock();
        assert_eq!(buckets.sources[&A.unwrap()].tokens, 1.0);
    }

    #[test]
    fn idle_sources_are_forgotten_when_the_table_is_full() {
        let limiter = limiter((1e9, u32::MAX), (1.0, 1));
        let now = Instant::now();
        for i in 0..MAX_SOURCES {
            let ip = IpAddr::from(u32::try_from(i).unwrap().to_be_bytes());
            assert_eq!(limiter.try_acquire_at(Some(ip), now), Ok(()));
        }
        // Every bucket is empty: a new source is still served, bounded by the global bucket.
        let newcomer = Some(IpAddr::from([192, 0, 2, 1]));
        assert_eq!(limiter.try_acquire_at(newcomer, now), Ok(()));
        assert_eq!(limiter.try_acquire_at(newcomer, now), Ok(()));
        // Once they have refilled, they are dropped and the newcomer gets its own bucket.
        let later = now + Duration::from_secs(2);
        assert_eq!(limiter.try_acquire_at(newcomer, later), Ok(()));
        assert!(limiter.try_acquire_at(newcomer, later).is_err());
        assert_eq!(limiter.buckets.lock().sources.len(), 1);
    }
}
