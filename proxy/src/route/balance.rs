//! Endpoint choice inside one cluster: the subset's label filter over the ready endpoints, then
//! the DestinationRule's load-balancing policy. Pure: the round-robin turn, random draws,
//! in-flight counts and the request's hash key are inputs, and the choice is returned as data
//! (an index into the candidates) for the I/O layer to connect to.

use std::net::IpAddr;

use trellis_config::proxy::{Endpoint, Service};
use trellis_config::traffic::{Cluster, HashKey, LoadBalancer};

use super::RequestAttributes;

/// Envoy's default minimum ring size; Istio's `minimumRingSize` overrides it.
pub const DEFAULT_RING_SIZE: u32 = 1024;
/// Bound on the ring size asked for, so a huge `minimumRingSize` cannot exhaust memory.
const MAX_RING_SIZE: u32 = 1 << 20;

/// The ready endpoints of `service` that belong to the cluster's subset (all of them without a
/// subset), in the service's order. `ejected` removes endpoints outlier detection took out.
pub fn candidates<'a>(
    service: &'a Service,
    cluster: Option<&Cluster>,
    ejected: impl Fn(&Endpoint) -> bool,
) -> Vec<&'a Endpoint> {
    service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter(|e| in_subset(e, cluster))
        .filter(|e| !ejected(e))
        .collect()
}

/// Whether `endpoint` has the labels of the cluster's subset (every endpoint without a subset).
pub fn in_subset(endpoint: &Endpoint, cluster: Option<&Cluster>) -> bool {
    cluster.is_none_or(|c| endpoint.labels.contains_all(&c.selector))
}

/// The per-request inputs of a pick.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickInput<'a> {
    /// This cluster's round-robin counter (the caller increments it per pick).
    pub turn: u64,
    /// Two uniformly random numbers.
    pub draws: [u64; 2],
    /// Requests in flight per candidate, parallel to the candidates (missing counts are 0).
    pub in_flight: &'a [u32],
    /// The request's consistent-hash key ([`hash_key`]); `None` falls back to a random pick.
    pub hash: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Index into the candidates.
    Endpoint(usize),
    /// `PASSTHROUGH`: connect to the address the application dialled.
    Passthrough,
    /// No candidate (Envoy's `UH`).
    NoHealthyUpstream,
}

/// A load balancer over a fixed candidate list; rebuild it when the candidates change (the ring
/// of a consistent hash is built here, once, not per request).
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: Policy,
    len: usize,
}

#[derive(Debug, Clone)]
enum Policy {
    RoundRobin,
    LeastRequest,
    Random,
    Passthrough,
    Ring(HashRing),
}

impl Balancer {
    pub fn new(lb: &LoadBalancer, candidates: &[&Endpoint]) -> Self {
        let policy = match lb {
            LoadBalancer::RoundRobin => Policy::RoundRobin,
            LoadBalancer::LeastRequest => Policy::LeastRequest,
            LoadBalancer::Random => Policy::Random,
            LoadBalancer::Passthrough => Policy::Passthrough,
            LoadBalancer::ConsistentHash(hash) => Policy::Ring(HashRing::new(
                candidates.iter().map(|e| e.address),
                hash.ring_size,
            )),
        };
        Self {
            policy,
            len: candidates.len(),
        }
    }

    pub fn pick(&self, input: &PickInput<'_>) -> Pick {
        let n = self.len as u64;
        let index = |value: u64| Pick::Endpoint(usize::try_from(value % n).unwrap_or(0));
        match &self.policy {
            Policy::Passthrough => Pick::Passthrough,
            _ if self.len == 0 => Pick::NoHealthyUpstream,
            Policy::RoundRobin => index(input.turn),
            Policy::Random => index(input.draws[0]),
            Policy::LeastRequest => {
                // Power of two choices (Envoy's LEAST_REQUEST with equal weights).
                let (a, b) = (input.draws[0] % n, input.draws[1] % n);
                let load = |i: u64| {
                    usize::try_from(i)
                        .ok()
                        .and_then(|i| input.in_flight.get(i))
                        .copied()
                        .unwrap_or(0)
                };
                index(if load(b) < load(a) { b } else { a })
            }
            Policy::Ring(ring) => match input.hash.and_then(|hash| ring.lookup(hash)) {
                Some(owner) => Pick::Endpoint(owner),
                None => index(input.draws[0]),
            },
        }
    }
}

/// A ketama-style ring. Every endpoint owns the same number of points whatever the pool size
/// (ketama's 160, or `ring_size / 8` when Istio's `minimumRingSize` asks for a larger ring),
/// derived from its address alone: adding or removing an endpoint adds or removes only its own
/// points, so only the keys on its arcs move. (Envoy divides the ring size by the pool size,
/// which moves keys between surviving endpoints whenever the pool changes.)
#[derive(Debug, Clone)]
pub struct HashRing {
    /// (point, candidate index), sorted by point.
    points: Vec<(u64, usize)>,
}

/// Points per endpoint at the default ring size.
const POINTS_PER_ENDPOINT: u32 = 160;

impl HashRing {
    pub fn new(addresses: impl ExactSizeIterator<Item = IpAddr>, ring_size: u32) -> Self {
        let size = if ring_size == 0 {
            DEFAULT_RING_SIZE
        } else {
            ring_size.min(MAX_RING_SIZE)
        };
        let per_endpoint = (size / 8).max(POINTS_PER_ENDPOINT) as usize;
        let mut points = Vec::with_capacity(per_endpoint * addresses.len());
        for (index, address) in addresses.enumerate() {
            let name = address.to_string();
            for replica in 0..per_endpoint {
                points.push((stable_hash(format!("{name}_{replica}").as_bytes()), index));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The candidate owning the first point at or after `hash` (wrapping).
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        let at = self.points.partition_point(|(point, _)| *point < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map(|(_, index)| *index)
    }
}

/// FNV-1a with a SplitMix64 finish: stable across processes, builds and platforms (the ring and
/// the keys must hash the same in every proxy, so std's randomly keyed hashers would not do).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The request's consistent-hash key, `None` when the request lacks it (no such header, cookie
/// or parameter).
pub fn hash_key(key: &HashKey, request: &RequestAttributes<'_>, source_ip: IpAddr) -> Option<u64> {
    let value = match key {
        HashKey::Header(name) => request
            .headers
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec()),
        HashKey::Cookie { name, .. } => cookie(request, name).map(|v| v.as_bytes().to_vec()),
        HashKey::SourceIp => Some(source_ip.to_string().into_bytes()),
        HashKey::QueryParam(name) => {
            super::query_value(request.query, name).map(|v| v.as_bytes().to_vec())
        }
    }?;
    Some(stable_hash(&value))
}

/// The hash cookie the proxy makes for a request that lacks it, and the key it routes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedCookie {
    /// The consistent-hash key of the generated value: the same key the request carrying the
    /// cookie back will hash to, so it reaches the same endpoint.
    pub hash: u64,
    /// The `Set-Cookie` header value for the response.
    pub set_cookie: String,
}

/// Envoy's cookie generation: when the policy hashes on a cookie with a `ttl` and the request
/// lacks it, the proxy makes a value (a hash of `seed`; Envoy hashes the downstream address),
/// routes by it, and sets it on the response. Without a `ttl` there is nothing to generate and
/// the request is balanced at random. A `ttl` of 0 makes a session cookie (no `Max-Age`), as in
/// Envoy; otherwise `Max-Age` is the ttl in whole seconds, at least 1.
pub fn generate_cookie(key: &HashKey, seed: u64) -> Option<GeneratedCookie> {
    let HashKey::Cookie {
        name,
        path,
        ttl_ms: Some(ttl_ms),
    } = key
    else {
        return None;
    };
    let value = format!("{:016x}", stable_hash(&seed.to_le_bytes()));
    let mut set_cookie = format!("{name}={value}");
    if let Some(path) = path {
        set_cookie.push_str("; Path=");
        set_cookie.push_str(path);
    }
    if *ttl_ms > 0 {
        set_cookie.push_str(&format!("; Max-Age={}", (ttl_ms / 1000).max(1)));
    }
    set_cookie.push_str("; HttpOnly");
    Some(GeneratedCookie {
        hash: stable_hash(value.as_bytes()),
        set_cookie,
    })
}

fn cookie<'r>(request: &RequestAttributes<'r>, name: &str) -> Option<&'r str> {
    request
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;
    use trellis_config::traffic::ConsistentHash;

    fn service(endpoints: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "hostnames": ["a.ns.svc.cluster.local"], "namespace": "ns", "vips": [],
            "ports": [], "endpoints": endpoints
        }))
        .unwrap()
    }

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| {
                serde_json::from_value(
                    json!({"address": format!("10.0.0.{i}"), "ready": true, "meshed": false}),
                )
                .unwrap()
            })
            .collect()
    }

    fn ring(size: u32) -> LoadBalancer {
        LoadBalancer::ConsistentHash(ConsistentHash {
            key: HashKey::SourceIp,
            ring_size: size,
        })
    }

    #[test]
    fn candidates_are_ready_subset_members_not_ejected() {
        let service = service(json!([
            {"address": "10.0.0.1", "ready": true, "meshed": true, "labels": {"version": "v1"}},
            {"address": "10.0.0.2", "ready": false, "meshed": true, "labels": {"version": "v1"}},
            {"address": "10.0.0.3", "ready": true, "meshed": true, "labels": {"version": "v2", "zone": "a"}},
            {"address": "10.0.0.4", "ready": true, "meshed": true, "labels": {"version": "v1"}}
        ]));
        let cluster = |selector: serde_json::Value| -> Cluster {
            serde_json::from_value(json!({"host": "a", "selector": selector})).unwrap()
        };
        let v1 = cluster(json!({"version": "v1"}));
        let v2a = cluster(json!({"version": "v2", "zone": "a"}));
        let none = cluster(json!({"version": "v9"}));
        // (cluster, ejected endpoint, expected candidates)
        let cases: [(Option<&Cluster>, Option<&str>, &[&str]); 5] = [
            (None, None, &["10.0.0.1", "10.0.0.3", "10.0.0.4"]),
            (Some(&v1), None, &["10.0.0.1", "10.0.0.4"]),
            (Some(&v1), Some("10.0.0.4"), &["10.0.0.1"]),
            (Some(&v2a), None, &["10.0.0.3"]),
            (Some(&none), None, &[]),
        ];
        for (cluster, ejected, expected) in cases {
            let is_ejected = |e: &Endpoint| Some(e.address.to_string().as_str()) == ejected;
            let got: Vec<String> = candidates(&service, cluster, is_ejected)
                .iter()
                .map(|e| e.address.to_string())
                .collect();
            assert_eq!(got, expected, "{cluster:?}");
        }
    }

    /// Picks `n` times with a seeded RNG and returns how often each candidate was chosen.
    fn distribution(lb: &LoadBalancer, in_flight: &[u32], n: u64) -> Vec<u64> {
        let eps = endpoints(in_flight.len());
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let balancer = Balancer::new(lb, &refs);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0; refs.len()];
        for turn in 0..n {
            let input = PickInput {
                turn,
                draws: [rng.random(), rng.random()],
                in_flight,
                hash: lb_hash(lb, &mut rng),
            };
            match balancer.pick(&input) {
                Pick::Endpoint(i) => counts[i] += 1,
                other => panic!("{other:?}"),
            }
        }
        counts
    }

    fn lb_hash(lb: &LoadBalancer, rng: &mut StdRng) -> Option<u64> {
        matches!(lb, LoadBalancer::ConsistentHash(_))
            .then(|| stable_hash(&rng.random::<u64>().to_le_bytes()))
    }

    #[test]
    fn policies_distribute_as_specified() {
        // Round robin: exactly even.
        assert_eq!(
            distribution(&LoadBalancer::RoundRobin, &[0; 4], 400),
            [100; 4]
        );
        // Random: within 10 % of even over 40,000 picks.
        for count in distribution(&LoadBalancer::Random, &[0; 4], 40_000) {
            assert!((9_000..=11_000).contains(&count), "random {count}");
        }
        // Least request, power of two choices: with equal load it is even; the loaded endpoint
        // is chosen only when both draws land on it (1/16 of picks for 4 endpoints).
        for count in distribution(&LoadBalancer::LeastRequest, &[0; 4], 40_000) {
            assert!((9_000..=11_000).contains(&count), "p2c even {count}");
        }
        let skewed = distribution(&LoadBalancer::LeastRequest, &[50, 0, 0, 0], 40_000);
        assert!(
            (2_000..=3_000).contains(&skewed[0]),
            "loaded endpoint {skewed:?}"
        );
        // Consistent hash over random keys: every endpoint owns a fair share of the ring.
        for count in distribution(&ring(1024), &[0; 4], 40_000) {
            assert!((7_000..=13_000).contains(&count), "ring {count}");
        }
    }

    #[test]
    fn passthrough_and_empty_pools() {
        let eps = endpoints(2);
        let refs: Vec<&Endpoint> = eps.iter().collect();
        assert_eq!(
            Balancer::new(&LoadBalancer::Passthrough, &refs).pick(&PickInput::default()),
            Pick::Passthrough
        );
        assert_eq!(
            Balancer::new(&LoadBalancer::RoundRobin, &[]).pick(&PickInput::default()),
            Pick::NoHealthyUpstream
        );
        assert_eq!(
            Balancer::new(&ring(16), &[]).pick(&PickInput {
                hash: Some(1),
                ..PickInput::default()
            }),
            Pick::NoHealthyUpstream
        );
    }

    #[test]
    fn consistent_hash_is_stable_when_endpoints_change() {
        let five: Vec<IpAddr> = endpoints(5).iter().map(|e| e.address).collect();
        let four: Vec<IpAddr> = five
            .iter()
            .copied()
            .filter(|a| a.to_string() != "10.0.0.3")
            .collect();
        let six: Vec<IpAddr> = endpoints(6).iter().map(|e| e.address).collect();
        let reversed: Vec<IpAddr> = five.iter().rev().copied().collect();
        // Each pool's ring, and a lookup returning the owning address of a key.
        let ring = |addresses: &[IpAddr]| {
            (
                addresses.to_vec(),
                HashRing::new(addresses.iter().copied(), 1024),
            )
        };
        let owner = |(addresses, ring): &(Vec<IpAddr>, HashRing), key: u64| {
            addresses[ring.lookup(stable_hash(&key.to_le_bytes())).unwrap()]
        };
        let (five, five_again, four, six, reversed) = (
            ring(&five),
            ring(&five),
            ring(&four),
            ring(&six),
            ring(&reversed),
        );
        let mut moved_on_add = 0;
        for key in 0..10_000u64 {
            let before = owner(&five, key);
            // Same endpoints, same owner (in every proxy: the hash is stable).
            assert_eq!(owner(&five_again, key), before);
            // The ring does not depend on the candidates' order.
            assert_eq!(owner(&reversed, key), before);
            // Removing one endpoint moves only the keys it owned.
            if before.to_string() != "10.0.0.3" {
                assert_eq!(owner(&four, key), before, "key {key} moved");
            }
            // Adding one moves about 1/6 of the keys, all to the new endpoint.
            let after = owner(&six, key);
            if after != before {
                assert_eq!(after.to_string(), "10.0.0.6");
                moved_on_add += 1;
            }
        }
        assert!(
            (1_000..=2_400).contains(&moved_on_add),
            "{moved_on_add} of 10000 moved"
        );
    }

    #[test]
    fn generated_cookies_route_like_the_cookie_sent_back() {
        let key = |path: Option<&str>, ttl_ms: Option<u64>| HashKey::Cookie {
            name: "session".into(),
            path: path.map(Into::into),
            ttl_ms,
        };
        let cases = [
            (
                key(Some("/"), Some(3_600_000)),
                Some("; Path=/; Max-Age=3600; HttpOnly"),
            ),
            (key(None, Some(1_500)), Some("; Max-Age=1; HttpOnly")),
            (key(Some("/app"), Some(0)), Some("; Path=/app; HttpOnly")),
            (key(Some("/"), None), None),
            (HashKey::Header("x-user".into()), None),
            (HashKey::SourceIp, None),
        ];
        for (key, attributes) in cases {
            let generated = generate_cookie(&key, 7);
            let Some(attributes) = attributes else {
                assert_eq!(generated, None, "{key:?}");
                continue;
            };
            let generated = generated.unwrap();
            let (pair, rest) = generated
                .set_cookie
                .split_at(generated.set_cookie.find(';').unwrap());
            assert_eq!(rest, attributes, "{key:?}");
            let value = pair.strip_prefix("session=").unwrap();
            assert_eq!(value.len(), 16, "{pair}");
            // The request that carries the cookie back hashes to the key the first one used.
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::COOKIE, pair.parse().unwrap());
            let labels = std::collections::BTreeMap::new();
            let request = RequestAttributes {
                method: "GET",
                path: "/",
                query: "",
                authority: &crate::host::Authority::parse("a"),
                scheme: "http",
                headers: &headers,
                source_labels: &labels,
                source_namespace: "ns",
                port: 80,
            };
            assert_eq!(
                hash_key(&key, &request, IpAddr::from([10, 0, 0, 1])),
                Some(generated.hash),
                "{key:?}"
            );
        }
        // Different seeds spread clients over the ring.
        let key = key(None, Some(1_000));
        assert_ne!(generate_cookie(&key, 1), generate_cookie(&key, 2));
    }

    #[test]
    fn hash_keys_come_from_the_request() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert(http::header::COOKIE, "a=1; session=s42".parse().unwrap());
        let labels = std::collections::BTreeMap::new();
        let request = RequestAttributes {
            method: "GET",
            path: "/",
            query: "tenant=t1&x=2",
            authority: &crate::host::Authority::parse("a"),
            scheme: "http",
            headers: &headers,
            source_labels: &labels,
            source_namespace: "ns",
            port: 80,
        };
        let source: IpAddr = "10.1.2.3".parse().unwrap();
        let cookie = |name: &str| HashKey::Cookie {
            name: name.into(),
            path: None,
            ttl_ms: None,
        };
        let cases = [
            (
                HashKey::Header("x-user".into()),
                Some(stable_hash(b"alice")),
            ),
            (HashKey::Header("x-none".into()), None),
            (cookie("session"), Some(stable_hash(b"s42"))),
            (cookie("nope"), None),
            (HashKey::SourceIp, Some(stable_hash(b"10.1.2.3"))),
            (
                HashKey::QueryParam("tenant".into()),
                Some(stable_hash(b"t1")),
            ),
            (HashKey::QueryParam("other".into()), None),
        ];
        for (key, expected) in cases {
            assert_eq!(hash_key(&key, &request, source), expected, "{key:?}");
        }
    }
}
