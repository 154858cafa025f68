//! Whether a failed try is retried, and after how long: Envoy's `retry_on` semantics for the
//! conditions Istio's `retryOn` names, and Envoy's fully jittered exponential backoff (base
//! 25 ms, the ceiling doubling per retry, capped at 10 × base). Pure: the random draw is an
//! argument.

use std::time::Duration;

use trellis_config::traffic::{RetryCondition, RetryPolicy};

/// Envoy's default `base_interval`.
pub const BASE_INTERVAL: Duration = Duration::from_millis(25);
/// Envoy's default `max_interval`: 10 × the base.
pub const MAX_INTERVAL: Duration = Duration::from_millis(250);

/// How one try ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The TCP (or TLS) connection to the endpoint could not be made.
    ConnectFailure,
    /// The connection or stream was reset (or closed) before a response.
    Reset,
    /// An HTTP/2 peer refused the stream (`REFUSED_STREAM`): it never processed it.
    RefusedStream,
    /// A response with this HTTP status (and no `grpc-status`, or `grpc-status: 0`).
    Status(u16),
    /// A gRPC response with this non-zero `grpc-status`.
    GrpcStatus(u32),
    /// The per-try timeout fired.
    PerTryTimeout,
}

impl Outcome {
    /// Whether the try failed at all (a 2xx–4xx response or gRPC OK is a success for retries).
    pub fn is_failure(self) -> bool {
        !matches!(self, Self::Status(code) if code < 500)
    }
}

/// Why a try is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The outcome is not a failure.
    Succeeded,
    /// No `retryOn` condition covers the outcome.
    NotRetriable,
    /// Every allowed retry has been used.
    Exhausted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    Retry { after: Duration },
    Stop(Stop),
}

/// Decides after `retries_done` retries (0 after the first try) whether to try again, and the
/// backoff before it. `draw` is a uniformly random number for the jitter.
pub fn decide(
    policy: &RetryPolicy,
    retries_done: u32,
    outcome: Outcome,
    draw: u64,
) -> RetryDecision {
    if !is_retriable(policy, outcome) {
        return RetryDecision::Stop(if outcome.is_failure() {
            Stop::NotRetriable
        } else {
            Stop::Succeeded
        });
    }
    if retries_done >= policy.attempts {
        return RetryDecision::Stop(Stop::Exhausted);
    }
    RetryDecision::Retry {
        after: backoff(retries_done + 1, draw),
    }
}

/// Whether some `retryOn` condition covers the outcome (Envoy's `wouldRetryFromReset`,
/// `wouldRetryFromHeaders` and its gRPC variant).
pub fn is_retriable(policy: &RetryPolicy, outcome: Outcome) -> bool {
    let on = |condition| policy.retry_on.has(condition);
    // 5xx, gateway-error and reset all retry a try that got no response at all.
    let no_response =
        on(RetryCondition::FiveXx) || on(RetryCondition::GatewayError) || on(RetryCondition::Reset);
    match outcome {
        Outcome::ConnectFailure => no_response || on(RetryCondition::ConnectFailure),
        Outcome::RefusedStream => no_response || on(RetryCondition::RefusedStream),
        Outcome::Reset | Outcome::PerTryTimeout => no_response,
        Outcome::Status(code) => {
            (on(RetryCondition::FiveXx) && (500..=599).contains(&code))
                || (on(RetryCondition::GatewayError) && matches!(code, 502..=504))
                || (on(RetryCondition::Retriable4xx) && code == 409)
                || (on(RetryCondition::RetriableStatusCodes)
                    && policy.retry_on.status_codes.contains(&code))
        }
        Outcome::GrpcStatus(status) => match status {
            1 => on(RetryCondition::Cancelled),
            4 => on(RetryCondition::DeadlineExceeded),
            8 => on(RetryCondition::ResourceExhausted),
            13 => on(RetryCondition::Internal),
            14 => on(RetryCondition::Unavailable),
            _ => false,
        },
    }
}

/// The backoff before retry number `retry` (1-based): uniform in `[0, ceiling)` where the
/// ceiling is `(2^retry − 1) × 25 ms` capped at 250 ms (Envoy's full jitter).
pub fn backoff(retry: u32, draw: u64) -> Duration {
    let ceiling = backoff_ceiling(retry);
    let millis = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(draw % millis)
}

/// The exclusive upper bound of [`backoff`] for retry number `retry`.
pub fn backoff_ceiling(retry: u32) -> Duration {
    let base = u64::try_from(BASE_INTERVAL.as_millis()).unwrap_or(u64::MAX);
    let max = u64::try_from(MAX_INTERVAL.as_millis()).unwrap_or(u64::MAX);
    let factor = 1u64.checked_shl(retry.max(1)).map_or(u64::MAX, |f| f - 1);
    Duration::from_millis(factor.saturating_mul(base).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::traffic::RetryOn;

    fn policy(attempts: u32, retry_on: &str) -> RetryPolicy {
        RetryPolicy {
            attempts,
            per_try_timeout_ms: None,
            retry_on: RetryOn::parse(retry_on).unwrap(),
        }
    }

    #[test]
    fn retry_decisions_follow_retry_on() {
        use Outcome::*;
        let istio = RetryPolicy::default();
        // (policy, outcome, retriable)
        let cases = [
            (&istio, ConnectFailure, true),
            (&istio, RefusedStream, true),
            (&istio, Status(503), true),
            (&istio, Status(502), false),
            (&istio, Reset, false),
            (&istio, PerTryTimeout, false),
            (&istio, GrpcStatus(14), true),
            (&istio, GrpcStatus(1), true),
            (&istio, GrpcStatus(4), false),
            (&policy(3, "5xx"), Status(500), true),
            (&policy(3, "5xx"), Status(599), true),
            (&policy(3, "5xx"), Status(404), false),
            (&policy(3, "5xx"), Reset, true),
            (&policy(3, "5xx"), ConnectFailure, true),
            (&policy(3, "5xx"), PerTryTimeout, true),
            (&policy(3, "gateway-error"), Status(504), true),
            (&policy(3, "gateway-error"), Status(500), false),
            (&policy(3, "gateway-error"), RefusedStream, true),
            (&policy(3, "reset"), Reset, true),
            (&policy(3, "reset"), Status(503), false),
            (&policy(3, "connect-failure"), ConnectFailure, true),
            (&policy(3, "connect-failure"), Reset, false),
            (&policy(3, "refused-stream"), RefusedStream, true),
            (&policy(3, "retriable-4xx"), Status(409), true),
            (&policy(3, "retriable-4xx"), Status(429), false),
            (&policy(3, "429,503"), Status(429), true),
            (&policy(3, "retriable-status-codes"), Status(503), false),
            (&policy(3, "deadline-exceeded"), GrpcStatus(4), true),
            (&policy(3, "internal"), GrpcStatus(13), true),
            (&policy(3, "resource-exhausted"), GrpcStatus(8), true),
            (&policy(3, "unavailable"), GrpcStatus(14), true),
            (&policy(3, "cancelled"), GrpcStatus(14), false),
            (&policy(3, "5xx"), GrpcStatus(14), false),
        ];
        for (policy, outcome, retriable) in cases {
            assert_eq!(
                is_retriable(policy, outcome),
                retriable,
                "{:?} {outcome:?}",
                policy.retry_on
            );
            let decision = decide(policy, 0, outcome, 0);
            assert_eq!(
                matches!(decision, RetryDecision::Retry { .. }),
                retriable,
                "{outcome:?} {decision:?}"
            );
        }
        assert_eq!(
            decide(&istio, 0, Status(200), 0),
            RetryDecision::Stop(Stop::Succeeded)
        );
        assert_eq!(
            decide(&istio, 0, Status(500), 0),
            RetryDecision::Stop(Stop::NotRetriable)
        );
    }

    #[test]
    fn attempts_bound_the_retries() {
        let istio = RetryPolicy::default();
        let decisions: Vec<bool> = (0..4)
            .map(|done| {
                matches!(
                    decide(&istio, done, Outcome::Status(503), 0),
                    RetryDecision::Retry { .. }
                )
            })
            .collect();
        assert_eq!(
            decisions,
            [true, true, false, false],
            "Istio's default allows 2 retries"
        );
        assert_eq!(
            decide(&istio, 2, Outcome::Status(503), 0),
            RetryDecision::Stop(Stop::Exhausted)
        );
        let disabled = policy(0, "5xx");
        assert_eq!(
            decide(&disabled, 0, Outcome::Status(503), 0),
            RetryDecision::Stop(Stop::Exhausted)
        );
    }

    #[test]
    fn backoff_is_fully_jittered_exponential_and_capped() {
        let ceilings: Vec<u128> = (1..=6).map(|n| backoff_ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [25, 75, 175, 250, 250, 250]);
        assert_eq!(
            backoff_ceiling(200),
            MAX_INTERVAL,
            "no overflow for absurd retry numbers"
        );
        for retry in 1..=8 {
            let ceiling = backoff_ceiling(retry);
            for draw in [0, 1, 24, 25, 74, 1_000_003, u64::MAX] {
                let delay = backoff(retry, draw);
                assert!(
                    delay < ceiling,
                    "retry {retry} draw {draw}: {delay:?} >= {ceiling:?}"
                );
            }
            assert_eq!(
                backoff(retry, 0),
                Duration::ZERO,
                "full jitter reaches zero"
            );
        }
        assert_eq!(backoff(1, 24), Duration::from_millis(24));
        assert_eq!(backoff(2, 74), Duration::from_millis(74));
        assert_eq!(backoff(2, 75), Duration::ZERO);
        match decide(&RetryPolicy::default(), 1, Outcome::ConnectFailure, 60) {
            RetryDecision::Retry { after } => assert_eq!(
                after,
                Duration::from_millis(60),
                "second retry: ceiling 75 ms"
            ),
            other => panic!("{other:?}"),
        }
    }
}
