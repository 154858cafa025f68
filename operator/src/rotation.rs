//! Rotation of the operator-generated root CA, triggered by a new value of
//! `Mesh.spec.certificates.rootRotation` and run in three phases so that no handshake fails:
//!
//! 1. `TrustBoth`: a new root is generated; every trust bundle (ConfigMaps, config snapshots,
//!    certificate answers, the 15012 client-certificate check, the webhook's caBundle) holds
//!    both roots while the old one still signs. Proxies are told to renew: a proxy reads that
//!    `renew` after the two-root snapshot on the same stream, so a certificate it obtains after
//!    the phase began proves it holds both roots.
//! 2. `SignNew`: the new root signs (workload and serving certificates); both are still trusted.
//!    Proxies are told to renew again, onto the new root.
//! 3. `Complete`: the old root is dropped from the Secret and from every bundle.
//!
//! A phase ends when every proxy connected to the config stream presents a certificate issued
//! after the phase began, or at the latest one workload-certificate lifetime after it began
//! (by then every certificate from before has been renewed or has expired). The phase, its
//! start and the keys it needs live in the CA Secret, so a restarted operator resumes the
//! rotation where it stopped.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::info;
use trellis_api::mesh::{RootRotationPhase, RootRotationStatus};

use crate::ca::{CaError, CaMaterial, CertificateAuthority};
use crate::error::Result;

/// The `rootRotation` value last started (annotation of the CA Secret).
pub const TRIGGER_ANNOTATION: &str = "trellis.dev/root-rotation";
/// The phase of that rotation.
pub const PHASE_ANNOTATION: &str = "trellis.dev/root-rotation-phase";
/// When the phase began (RFC 3339).
pub const SINCE_ANNOTATION: &str = "trellis.dev/root-rotation-since";
/// `TrustBoth`: the new root and its key, trusted but not signing yet.
pub const NEXT_CA_CERT_KEY: &str = "next-ca-cert.pem";
pub const NEXT_CA_KEY_KEY: &str = "next-ca-key.pem";
/// `SignNew`: the old root, still trusted.
pub const PREVIOUS_ROOT_KEY: &str = "previous-root-cert.pem";

/// A rotation as recorded in the CA Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub trigger: String,
    pub phase: RootRotationPhase,
    pub since: OffsetDateTime,
}

impl Rotation {
    /// Proxies whose certificate was issued before this instant are told to renew.
    pub fn renew_issued_before(&self) -> Option<OffsetDateTime> {
        match self.phase {
            RootRotationPhase::TrustBoth | RootRotationPhase::SignNew => Some(self.since),
            RootRotationPhase::Complete => None,
        }
    }

    pub fn in_progress(&self) -> bool {
        self.phase != RootRotationPhase::Complete
    }

    /// The status block; `bound` is the longest a phase waits.
    pub fn status(&self, bound: Duration) -> RootRotationStatus {
        let deadline = rfc3339(self.since + bound);
        let message = match self.phase {
            RootRotationPhase::TrustBoth => format!(
                "both roots are trusted, the old one signs; waiting until every connected proxy \
                 has renewed onto the two-root trust bundle (at the latest until {deadline})"
            ),
            RootRotationPhase::SignNew => format!(
                "both roots are trusted, the new one signs; waiting until every connected proxy \
                 holds a certificate from the new root (at the latest until {deadline})"
            ),
            RootRotationPhase::Complete => "only the new root is trusted".to_owned(),
        };
        RootRotationStatus {
            trigger: self.trigger.clone(),
            phase: self.phase,
            since: rfc3339(self.since),
            message,
        }
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// What to do with the rotation now. Pure, so every case is tested without a cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do, or the current phase is still waiting.
    Stay,
    /// A new trigger: generate a new root and enter `TrustBoth`.
    Start,
    /// The current phase is done: enter this one.
    Advance(RootRotationPhase),
}

/// Decides the next step. A rotation in progress is always finished first, even when the
/// trigger is removed or changed meanwhile (the new value then starts the next one).
pub fn next_step(
    rotation: Option<&Rotation>,
    trigger: Option<&str>,
    progress: Progress,
    now: OffsetDateTime,
    bound: Duration,
) -> Step {
    match rotation {
        Some(rotation) if rotation.in_progress() => {
            let all_renewed = progress.settled && progress.renewed == progress.connected;
            if all_renewed || now >= rotation.since + bound {
                Step::Advance(match rotation.phase {
                    RootRotationPhase::TrustBoth => RootRotationPhase::SignNew,
                    _ => RootRotationPhase::Complete,
                })
            } else {
                Step::Stay
            }
        }
        Some(done) if trigger.is_none_or(|t| t == done.trigger) => Step::Stay,
        None if trigger.is_none() => Step::Stay,
        _ => Step::Start,
    }
}

/// How many connected proxies hold a certificate issued since a phase began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub renewed: usize,
    pub connected: usize,
    /// Whether the control plane has served long enough for every running proxy to have
    /// reconnected ([`RECONNECT_WINDOW`]). Before that, "all connected proxies renewed" says
    /// nothing: right after an operator restart no proxy is connected yet.
    pub settled: bool,
}

/// Longest a running proxy takes to reconnect to a new control plane: its capped backoff
/// (30 s) plus connect and TLS timeouts, with margin.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// The certificates proxies present on their config streams to this replica (a proxy
/// reconnects with each new certificate), by the time they were issued.
#[derive(Debug)]
pub struct ProxyCertificates {
    started: Instant,
    next_id: AtomicU64,
    issued: Mutex<BTreeMap<u64, Option<OffsetDateTime>>>,
}

impl Default for ProxyCertificates {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            next_id: AtomicU64::new(0),
            issued: Mutex::default(),
        }
    }
}

/// Removes its stream from [`ProxyCertificates`] when the stream ends, however it ends.
#[derive(Debug)]
pub struct Registration<'a> {
    registry: &'a ProxyCertificates,
    id: u64,
}

impl ProxyCertificates {
    /// Records a stream whose client certificate was issued at `issued` (`None`: unknown).
    pub fn register(&self, issued: Option<OffsetDateTime>) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.issued.lock().insert(id, issued);
        Registration { registry: self, id }
    }

    pub fn progress(&self, since: OffsetDateTime) -> Progress {
        let issued = self.issued.lock();
        Progress {
            renewed: issued
                .values()
                .filter(|at| at.is_some_and(|at| at >= since))
                .count(),
            connected: issued.len(),
            settled: self.started.elapsed() >= RECONNECT_WINDOW,
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.issued.lock().remove(&self.id);
    }
}

/// Annotations for a newly created CA Secret: a root created while `rootRotation` is already
/// set needs no rotation for that value.
pub fn annotations_for_new_root(trigger: Option<&str>) -> BTreeMap<String, String> {
    trigger
        .map(|trigger| Rotation {
            trigger: trigger.to_owned(),
            phase: RootRotationPhase::Complete,
            since: phase_start(OffsetDateTime::now_utc()),
        })
        .map(|rotation| annotations(&rotation))
        .unwrap_or_default()
}

fn annotations(rotation: &Rotation) -> BTreeMap<String, String> {
    let phase = match rotation.phase {
        RootRotationPhase::TrustBoth => "TrustBoth",
        RootRotationPhase::SignNew => "SignNew",
        RootRotationPhase::Complete => "Complete",
    };
    [
        (TRIGGER_ANNOTATION, rotation.trigger.clone()),
        (PHASE_ANNOTATION, phase.to_owned()),
        (SINCE_ANNOTATION, rfc3339(rotation.since)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A phase starts at the next whole second: certificate times have second precision, so a
/// certificate issued before the switch can never look issued at or after it.
fn phase_start(now: OffsetDateTime) -> OffsetDateTime {
    now.replace_nanosecond(0).unwrap_or(now) + Duration::from_secs(1)
}

/// The rotation recorded in a Secret's annotations; a partial or unreadable record is an error
/// naming the annotation, never silently ignored (it would restart or abandon a rotation).
pub fn recorded(secret: &Secret) -> Result<Option<Rotation>, CaError> {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let Some(trigger) = annotations.get(TRIGGER_ANNOTATION) else {
        return Ok(None);
    };
    let bad = |what: &str| CaError::RotationState(format!("annotation {what}"));
    let phase = match annotations.get(PHASE_ANNOTATION).map(String::as_str) {
        Some("TrustBoth") => RootRotationPhase::TrustBoth,
        Some("SignNew") => RootRotationPhase::SignNew,
        Some("Complete") => RootRotationPhase::Complete,
        other => return Err(bad(&format!("{PHASE_ANNOTATION} is {other:?}"))),
    };
    let since = annotations
        .get(SINCE_ANNOTATION)
        .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok())
        .ok_or_else(|| bad(&format!("{SINCE_ANNOTATION} is missing or not RFC 3339")))?;
    Ok(Some(Rotation {
        trigger: trigger.clone(),
        phase,
        since,
    }))
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|ByteString(bytes)| String::from_utf8_lossy(bytes).into_owned())
        .filter(|text| !text.trim().is_empty())
}

fn required(secret: &Secret, key: &'static str, phase: &str) -> Result<String, CaError> {
    text(secret, key)
        .ok_or_else(|| CaError::RotationState(format!("phase {phase} needs data key {key}")))
}

/// Loads the signing CA of `current` with the other root the recorded phase still trusts.
pub fn load(
    secret: &Secret,
    current: CaMaterial,
    rotation: Option<&Rotation>,
) -> Result<CertificateAuthority, CaError> {
    let other = match rotation.map(|r| r.phase) {
        Some(RootRotationPhase::TrustBoth) => {
            vec![required(secret, NEXT_CA_CERT_KEY, "TrustBoth")?]
        }
        Some(RootRotationPhase::SignNew) => {
            vec![required(secret, PREVIOUS_ROOT_KEY, "SignNew")?]
        }
        Some(RootRotationPhase::Complete) | None => Vec::new(),
    };
    CertificateAuthority::load_trusting(current, &other)
}

/// The CA to use now and the rotation it is in, after taking at most one step.
pub struct Outcome {
    pub ca: CertificateAuthority,
    pub rotation: Option<Rotation>,
    /// The phase entered by this call, for an event.
    pub entered: Option<RootRotationPhase>,
}

/// What the Mesh asks of the rotation.
#[derive(Clone, Copy, Debug)]
pub struct Settings<'a> {
    /// `spec.certificates.rootRotation`.
    pub trigger: Option<&'a str>,
    pub trust_domain: &'a str,
    /// Lifetime of a new root.
    pub root_ttl: Duration,
    /// Longest wait of a phase: the workload certificate lifetime.
    pub bound: Duration,
    /// Whether this replica is the only one serving proxies. Other replicas serve config
    /// streams too, and their proxies are not in this replica's [`ProxyCertificates`]: then
    /// "every connected proxy renewed" proves nothing and only `bound` ends a phase.
    pub sole_server: bool,
}

/// Advances the rotation recorded in our CA Secret by at most one phase and returns the CA to
/// use. Each step is one `replace` of the Secret with its resourceVersion: a concurrent writer
/// makes it fail with a conflict and the next reconcile starts over from what was written.
pub async fn reconcile(
    secrets: &Api<Secret>,
    mut secret: Secret,
    current: CaMaterial,
    settings: Settings<'_>,
    progress: &ProxyCertificates,
) -> Result<Outcome> {
    let Settings {
        trigger,
        trust_domain,
        root_ttl,
        bound,
        sole_server,
    } = settings;
    let rotation = recorded(&secret)?;
    let now = OffsetDateTime::now_utc();
    let observed = rotation.as_ref().map_or(
        Progress {
            renewed: 0,
            connected: 0,
            settled: false,
        },
        |r| {
            let observed = progress.progress(r.since);
            Progress {
                settled: observed.settled && sole_server,
                ..observed
            }
        },
    );
    let step = next_step(rotation.as_ref(), trigger, observed, now, bound);
    let (material, next_rotation) = match step {
        Step::Stay => {
            let ca = load(&secret, current, rotation.as_ref())?;
            return Ok(Outcome {
                ca,
                rotation,
                entered: None,
            });
        }
        Step::Start => {
            let next = CaMaterial::generate_root(trust_domain, root_ttl)?;
            set(&mut secret, NEXT_CA_CERT_KEY, Some(&next.root_cert));
            set(&mut secret, NEXT_CA_KEY_KEY, Some(&next.ca_key));
            let rotation = Rotation {
                trigger: trigger.unwrap_or_default().to_owned(),
                phase: RootRotationPhase::TrustBoth,
                since: phase_start(now),
            };
            (current, rotation)
        }
        Step::Advance(RootRotationPhase::SignNew) => {
            let next = CaMaterial {
                ca_cert: required(&secret, NEXT_CA_CERT_KEY, "TrustBoth")?,
                ca_key: required(&secret, NEXT_CA_KEY_KEY, "TrustBoth")?,
                root_cert: required(&secret, NEXT_CA_CERT_KEY, "TrustBoth")?,
                cert_chain: String::new(),
            };
            for (key, value) in next.to_secret_data() {
                set(&mut secret, key, Some(&value));
            }
            set(&mut secret, PREVIOUS_ROOT_KEY, Some(&current.root_cert));
            set(&mut secret, NEXT_CA_CERT_KEY, None);
            set(&mut secret, NEXT_CA_KEY_KEY, None);
            (next, advanced(rotation, RootRotationPhase::SignNew, now))
        }
        Step::Advance(phase) => {
            set(&mut secret, PREVIOUS_ROOT_KEY, None);
            (current, advanced(rotation, phase, now))
        }
    };
    secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(annotations(&next_rotation));
    let name = secret.metadata.name.clone().unwrap_or_default();
    let written = secrets
        .replace(&name, &PostParams::default(), &secret)
        .await?;
    match step {
        Step::Start => info!(trigger = next_rotation.trigger, "root rotation started"),
        _ => info!(
            trigger = next_rotation.trigger,
            phase = ?next_rotation.phase,
            renewed = observed.renewed,
            connected = observed.connected,
            settled = observed.settled,
            "root rotation entered a new phase"
        ),
    }
    let ca = load(&written, material, Some(&next_rotation))?;
    Ok(Outcome {
        ca,
        entered: Some(next_rotation.phase),
        rotation: Some(next_rotation),
    })
}

fn advanced(rotation: Option<Rotation>, phase: RootRotationPhase, now: OffsetDateTime) -> Rotation {
    Rotation {
        trigger: rotation.map(|r| r.trigger).unwrap_or_default(),
        phase,
        since: phase_start(now),
    }
}

/// Sets (or with `None` removes) one data key of the Secret.
fn set(secret: &mut Secret, key: &str, value: Option<&str>) {
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    match value {
        Some(value) => {
            data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
        }
        None => {
            data.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(120);

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).unwrap()
    }

    fn rotation(trigger: &str, phase: RootRotationPhase) -> Rotation {
        Rotation {
            trigger: trigger.to_owned(),
            phase,
            since: at(0),
        }
    }

    #[test]
    fn steps_follow_the_trigger_and_the_proxies() {
        use RootRotationPhase::*;
        let progress = |renewed, connected| Progress {
            renewed,
            connected,
            settled: true,
        };
        let (all, some, none) = (progress(3, 3), progress(2, 3), progress(0, 0));
        let just_restarted = Progress {
            settled: false,
            ..none
        };
        let trust_both = rotation("r1", TrustBoth);
        let sign_new = rotation("r1", SignNew);
        let complete = rotation("r1", Complete);
        // (case, recorded rotation, trigger, progress, seconds since the phase began, step)
        type Case<'a> = (
            &'a str,
            Option<&'a Rotation>,
            Option<&'a str>,
            Progress,
            i64,
            Step,
        );
        #[rustfmt::skip]
        let cases: [Case; 14] = [
            ("no trigger, no rotation", None, None, all, 10, Step::Stay),
            ("first trigger", None, Some("r1"), all, 10, Step::Start),
            ("same trigger done", Some(&complete), Some("r1"), all, 10, Step::Stay),
            ("trigger removed after", Some(&complete), None, all, 10, Step::Stay),
            ("new trigger", Some(&complete), Some("r2"), all, 10, Step::Start),
            ("all renewed", Some(&trust_both), Some("r1"), all, 10, Step::Advance(SignNew)),
            ("no proxy at all", Some(&trust_both), Some("r1"), none, 1, Step::Advance(SignNew)),
            ("one lagging", Some(&trust_both), Some("r1"), some, 10, Step::Stay),
            ("lagging past bound", Some(&trust_both), Some("r1"), some, 120, Step::Advance(SignNew)),
            ("sign new, all renewed", Some(&sign_new), Some("r1"), all, 10, Step::Advance(Complete)),
            ("sign new, lagging", Some(&sign_new), None, some, 119, Step::Stay),
            ("changed mid-rotation", Some(&sign_new), Some("r2"), all, 10, Step::Advance(Complete)),
            ("restarted, none back yet", Some(&trust_both), Some("r1"), just_restarted, 10, Step::Stay),
            ("restarted, past bound", Some(&sign_new), None, just_restarted, 120, Step::Advance(Complete)),
        ];
        for (name, recorded, trigger, progress, now, expected) in cases {
            assert_eq!(
                next_step(recorded, trigger, progress, at(now), BOUND),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn progress_counts_live_streams_by_issue_time() {
        let registry = ProxyCertificates::default();
        let old = registry.register(Some(at(-5)));
        let _new = registry.register(Some(at(0)));
        let unknown = registry.register(None);
        let counts = |p: Progress| (p.renewed, p.connected);
        assert_eq!(counts(registry.progress(at(0))), (1, 3));
        assert!(
            !registry.progress(at(0)).settled,
            "a new control plane has not seen every proxy reconnect yet"
        );
        drop(old);
        drop(unknown);
        assert_eq!(counts(registry.progress(at(0))), (1, 1));
    }

    #[test]
    fn phases_start_on_the_next_whole_second() {
        let now = at(0) + Duration::from_millis(300);
        assert_eq!(phase_start(now), at(1));
        assert_eq!(phase_start(at(0)), at(1));
    }

    fn secret_with(annotations: &[(&str, &str)], data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn the_record_round_trips_and_partial_records_are_errors() {
        let recorded_rotation = Rotation {
            trigger: "2026-11-25".to_owned(),
            phase: RootRotationPhase::SignNew,
            since: at(0),
        };
        let written = annotations(&recorded_rotation);
        let pairs: Vec<(&str, &str)> = written
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            recorded(&secret_with(&pairs, &[])).unwrap(),
            Some(recorded_rotation)
        );
        assert_eq!(recorded(&secret_with(&[], &[])).unwrap(), None);
        for broken in [
            vec![(TRIGGER_ANNOTATION, "x")],
            vec![(TRIGGER_ANNOTATION, "x"), (PHASE_ANNOTATION, "Sideways")],
            vec![
                (TRIGGER_ANNOTATION, "x"),
                (PHASE_ANNOTATION, "Complete"),
                (SINCE_ANNOTATION, "yesterday"),
            ],
        ] {
            let err = recorded(&secret_with(&broken, &[])).unwrap_err();
            assert!(err.to_string().contains("annotation"), "{broken:?}: {err}");
        }
    }

    #[test]
    fn loading_a_phase_trusts_the_other_root_and_needs_its_keys() {
        let old = CaMaterial::generate_root("td", Duration::from_secs(3600)).unwrap();
        let new = CaMaterial::generate_root("td", Duration::from_secs(3600)).unwrap();
        let trust_both = rotation("r", RootRotationPhase::TrustBoth);
        let secret = secret_with(&[], &[(NEXT_CA_CERT_KEY, &new.root_cert)]);
        let ca = load(&secret, old.clone(), Some(&trust_both)).unwrap();
        assert_eq!(
            ca.trust_bundle(),
            [old.root_cert.clone(), new.root_cert.clone()]
        );

        let sign_new = rotation("r", RootRotationPhase::SignNew);
        let secret = secret_with(&[], &[(PREVIOUS_ROOT_KEY, &old.root_cert)]);
        let ca = load(&secret, new.clone(), Some(&sign_new)).unwrap();
        assert_eq!(
            ca.trust_bundle(),
            [new.root_cert.clone(), old.root_cert.clone()]
        );

        let complete = rotation("r", RootRotationPhase::Complete);
        let ca = load(&secret, new.clone(), Some(&complete)).unwrap();
        assert_eq!(ca.trust_bundle(), std::slice::from_ref(&new.root_cert));

        let err = load(&secret_with(&[], &[]), new, Some(&sign_new)).unwrap_err();
        assert!(err.to_string().contains(PREVIOUS_ROOT_KEY), "{err}");
    }
}
