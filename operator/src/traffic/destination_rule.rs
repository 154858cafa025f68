//! DestinationRule → clusters: which rule applies to a service as seen from a namespace, the
//! merge of its top-level, port-level and subset policies, and the cluster each subset and port
//! compiles to (load balancer, connection pool, outlier detection, client TLS).

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use trellis_api::istio::export_to::exported_to;
use trellis_api::istio::host;
use trellis_api::networking::DestinationRule;
use trellis_api::networking::destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection as DrOutlier,
    SimpleLb, TlsMode as DrTlsMode, TrafficPolicy,
};
use trellis_config::proxy::Service;
use trellis_config::traffic::{
    ClientTls, Cluster, ConnectionPool, ConsistentHash, HashKey, LoadBalancer, OutlierDetection,
    TcpKeepalive, TlsMode,
};

use super::{TrafficInputs, creation_key, describe, duration_field, fqdn, port_u16};

pub(super) fn clusters(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    services: &[&Service],
    warnings: &mut Vec<String>,
) -> Vec<Cluster> {
    let mut usable: Vec<&DestinationRule> = Vec::new();
    for rule in inputs.destination_rules {
        if rule.spec.workload_selector.is_some() {
            warnings.push(format!(
                "{}: workloadSelector is not supported; rule skipped",
                describe("DestinationRule", rule)
            ));
            continue;
        }
        let ignored = destination_rule_ignored_fields(rule);
        if !ignored.is_empty() {
            warnings.push(format!(
                "{}: not supported, ignored: {}",
                describe("DestinationRule", rule),
                ignored.join(", ")
            ));
        }
        usable.push(rule);
    }
    usable.sort_by_key(|r| creation_key(*r));
    let mut out = Vec::new();
    for service in services {
        let Some(rule) = destination_rule_for(&usable, namespace, service, inputs.root_namespace)
        else {
            continue;
        };
        out.extend(service_clusters(service, rule, warnings));
    }
    out
}

/// Fields a DestinationRule may set that the proxy does not implement (locality load
/// balancing, slow start, tunnels, PROXY protocol, retry budgets, local-origin outlier counting,
/// CRLs), named for the warning.
fn destination_rule_ignored_fields(rule: &DestinationRule) -> Vec<String> {
    let mut ignored = Vec::new();
    let mut check = |prefix: &str, policy: &TrafficPolicy| {
        let lb = policy.load_balancer.as_ref();
        let found = [
            (
                "loadBalancer.localityLbSetting",
                lb.is_some_and(|l| l.locality_lb_setting.is_some()),
            ),
            (
                "loadBalancer.warmupDurationSecs",
                lb.is_some_and(|l| l.warmup_duration_secs.is_some()),
            ),
            (
                "loadBalancer.warmup",
                lb.is_some_and(|l| l.warmup.is_some()),
            ),
            ("tunnel", policy.tunnel.is_some()),
            ("proxyProtocol", policy.proxy_protocol.is_some()),
            ("retryBudget", policy.retry_budget.is_some()),
            (
                "outlierDetection.consecutiveLocalOriginFailures",
                policy
                    .outlier_detection
                    .as_ref()
                    .is_some_and(|o| o.consecutive_local_origin_failures.is_some()),
            ),
            (
                "tls.caCrl",
                policy.tls.as_ref().is_some_and(|t| t.ca_crl.is_some()),
            ),
        ];
        for (field, set) in found {
            if set {
                ignored.push(format!("{prefix}{field}"));
            }
        }
    };
    if let Some(policy) = &rule.spec.traffic_policy {
        check("trafficPolicy.", policy);
    }
    for subset in &rule.spec.subsets {
        if let Some(policy) = &subset.traffic_policy {
            check(&format!("subsets[{}].trafficPolicy.", subset.name), policy);
        }
    }
    ignored
}

/// Istio's lookup order: the client's namespace, the service's, the root namespace.
fn destination_rule_for<'r>(
    rules: &[&'r DestinationRule],
    client_namespace: &str,
    service: &Service,
    root_namespace: &str,
) -> Option<&'r DestinationRule> {
    let in_namespace = |namespace: &str| {
        // `rules` is in creation order and only a more specific host replaces the pick, so the
        // oldest wins ties.
        let mut best: Option<((bool, usize), &'r DestinationRule)> = None;
        for rule in rules
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(namespace))
            .filter(|r| exported_to(&r.spec.export_to, namespace, client_namespace))
        {
            let pattern = host::qualify(&rule.spec.host, namespace);
            if !service.hostnames.iter().any(|h| host::matches(&pattern, h)) {
                continue;
            }
            let score = host::specificity(&pattern);
            if best.is_none_or(|(current, _)| score > current) {
                best = Some((score, *rule));
            }
        }
        best.map(|(_, rule)| rule)
    };
    in_namespace(client_namespace)
        .or_else(|| in_namespace(&service.namespace))
        .or_else(|| in_namespace(root_namespace))
}

/// The four mergeable parts of a traffic policy.
#[derive(Clone, Default)]
struct Effective {
    load_balancer: Option<LoadBalancerSettings>,
    connection_pool: Option<ConnectionPoolSettings>,
    outlier_detection: Option<DrOutlier>,
    tls: Option<ClientTlsSettings>,
}

/// A policy's fields for `port`: its port-level entry for the port replaces all four (Istio:
/// port-level settings do not inherit), else the top level.
fn port_resolved(policy: Option<&TrafficPolicy>, port: Option<u16>) -> Effective {
    let Some(policy) = policy else {
        return Effective::default();
    };
    let port_level = port.and_then(|port| {
        policy
            .port_level_settings
            .iter()
            .find(|p| p.port.and_then(|s| s.number) == Some(u32::from(port)))
    });
    match port_level {
        Some(p) => Effective {
            load_balancer: p.load_balancer.clone(),
            connection_pool: p.connection_pool.clone(),
            outlier_detection: p.outlier_detection.clone(),
            tls: p.tls.clone(),
        },
        None => Effective {
            load_balancer: policy.load_balancer.clone(),
            connection_pool: policy.connection_pool.clone(),
            outlier_detection: policy.outlier_detection.clone(),
            tls: policy.tls.clone(),
        },
    }
}

/// Istio's `MergeSubsetTrafficPolicy`: the subset's (port-resolved) fields override the
/// destination's (port-resolved) ones, field by field.
fn merged(
    top: Option<&TrafficPolicy>,
    subset: Option<&TrafficPolicy>,
    port: Option<u16>,
) -> Effective {
    let base = port_resolved(top, port);
    let over = port_resolved(subset, port);
    Effective {
        load_balancer: over.load_balancer.or(base.load_balancer),
        connection_pool: over.connection_pool.or(base.connection_pool),
        outlier_detection: over.outlier_detection.or(base.outlier_detection),
        tls: over.tls.or(base.tls),
    }
}

fn policy_ports(policy: Option<&TrafficPolicy>) -> BTreeSet<u16> {
    policy
        .map(|p| {
            p.port_level_settings
                .iter()
                .filter_map(|s| s.port.and_then(|p| p.number).and_then(port_u16))
                .collect()
        })
        .unwrap_or_default()
}

fn service_clusters(
    service: &Service,
    rule: &DestinationRule,
    warnings: &mut Vec<String>,
) -> Vec<Cluster> {
    let owner = describe("DestinationRule", rule);
    let top = rule.spec.traffic_policy.as_ref();
    let host = fqdn(service).to_owned();
    let mut out = Vec::new();
    let mut emit =
        |subset: &str, selector: &BTreeMap<String, String>, policy: Option<&TrafficPolicy>| {
            // Port 0: the host-wide entry; then one per port that has port-level settings.
            let ports = std::iter::once(None).chain(
                policy_ports(top)
                    .union(&policy_ports(policy))
                    .copied()
                    .map(Some)
                    .collect::<Vec<_>>(),
            );
            for port in ports {
                let effective = merged(top, policy, port);
                out.push(cluster(
                    &host,
                    subset,
                    port.unwrap_or(0),
                    selector,
                    &effective,
                    &owner,
                    warnings,
                ));
            }
        };
    emit("", &BTreeMap::new(), None);
    for subset in &rule.spec.subsets {
        emit(&subset.name, &subset.labels, subset.traffic_policy.as_ref());
    }
    out
}

fn cluster(
    host: &str,
    subset: &str,
    port: u16,
    selector: &BTreeMap<String, String>,
    effective: &Effective,
    owner: &str,
    warnings: &mut Vec<String>,
) -> Cluster {
    Cluster {
        host: host.to_owned(),
        subset: subset.to_owned(),
        port,
        selector: selector.clone(),
        lb: effective
            .load_balancer
            .as_ref()
            .map_or(LoadBalancer::default(), |lb| {
                load_balancer(lb, owner, warnings)
            }),
        connection_pool: effective
            .connection_pool
            .as_ref()
            .map(|p| connection_pool(p, owner, warnings))
            .unwrap_or_default(),
        outlier_detection: effective
            .outlier_detection
            .as_ref()
            .map(|o| outlier(o, owner, warnings)),
        tls: effective.tls.as_ref().map(client_tls),
    }
}

fn load_balancer(
    lb: &LoadBalancerSettings,
    owner: &str,
    warnings: &mut Vec<String>,
) -> LoadBalancer {
    if let Some(hash) = &lb.consistent_hash {
        let key = if let Some(header) = &hash.http_header_name {
            HashKey::Header(header.to_ascii_lowercase())
        } else if let Some(cookie) = &hash.http_cookie {
            HashKey::Cookie {
                name: cookie.name.clone(),
                path: cookie.path.clone(),
                ttl_ms: duration_field(cookie.ttl.as_ref(), "httpCookie.ttl", owner, warnings),
            }
        } else if hash.use_source_ip == Some(true) {
            HashKey::SourceIp
        } else if let Some(name) = &hash.http_query_parameter_name {
            HashKey::QueryParam(name.clone())
        } else {
            warnings.push(format!(
                "{owner}: consistentHash without a hash key; LEAST_REQUEST used"
            ));
            return LoadBalancer::LeastRequest;
        };
        if hash.maglev.is_some() {
            warnings.push(format!("{owner}: maglev is served by the ring hash"));
        }
        let ring_size = hash
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .or(hash.minimum_ring_size)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        return LoadBalancer::ConsistentHash(ConsistentHash { key, ring_size });
    }
    match lb.simple {
        Some(SimpleLb::RoundRobin) => LoadBalancer::RoundRobin,
        Some(SimpleLb::Random) => LoadBalancer::Random,
        Some(SimpleLb::Passthrough) => LoadBalancer::Passthrough,
        Some(SimpleLb::LeastConn | SimpleLb::LeastRequest | SimpleLb::Unspecified) | None => {
            LoadBalancer::LeastRequest
        }
    }
}

fn positive(value: Option<i32>) -> Option<u32> {
    value.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

fn connection_pool(
    pool: &ConnectionPoolSettings,
    owner: &str,
    warnings: &mut Vec<String>,
) -> ConnectionPool {
    let tcp = pool.tcp.as_ref();
    let http = pool.http.as_ref();
    let mut duration =
        |value: Option<&String>, field: &str| duration_field(value, field, owner, warnings);
    ConnectionPool {
        max_connections: positive(tcp.and_then(|t| t.max_connections)),
        connect_timeout_ms: duration(
            tcp.and_then(|t| t.connect_timeout.as_ref()),
            "tcp.connectTimeout",
        ),
        tcp_keepalive: tcp
            .and_then(|t| t.tcp_keepalive.as_ref())
            .map(|k| TcpKeepalive {
                probes: k.probes,
                time_ms: duration(k.time.as_ref(), "tcpKeepalive.time"),
                interval_ms: duration(k.interval.as_ref(), "tcpKeepalive.interval"),
            }),
        max_connection_duration_ms: duration(
            tcp.and_then(|t| t.max_connection_duration.as_ref()),
            "tcp.maxConnectionDuration",
        ),
        http1_max_pending_requests: positive(http.and_then(|h| h.http1_max_pending_requests)),
        http2_max_requests: positive(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: positive(http.and_then(|h| h.max_requests_per_connection)),
        max_retries: positive(http.and_then(|h| h.max_retries)),
        // HTTP's idle timeout when set, else TCP's (Istio applies both to the upstream).
        idle_timeout_ms: duration(
            http.and_then(|h| h.idle_timeout.as_ref())
                .or_else(|| tcp.and_then(|t| t.idle_timeout.as_ref())),
            "idleTimeout",
        ),
        max_concurrent_streams: positive(http.and_then(|h| h.max_concurrent_streams)),
        h2_upgrade: http.and_then(|h| h.h2_upgrade_policy)
            == Some(trellis_api::networking::destination_rule::H2UpgradePolicy::Upgrade),
        use_client_protocol: http.and_then(|h| h.use_client_protocol).unwrap_or(false),
    }
}

fn outlier(o: &DrOutlier, owner: &str, warnings: &mut Vec<String>) -> OutlierDetection {
    let defaults = OutlierDetection::default();
    let percent = |value: Option<i32>, default: u32| {
        value.map_or(default, |v| {
            u32::try_from(v.clamp(0, 100)).unwrap_or(default)
        })
    };
    if o.split_external_local_origin_errors == Some(true) {
        warnings.push(format!(
            "{owner}: splitExternalLocalOriginErrors is not supported; local errors count as 5xx"
        ));
    }
    OutlierDetection {
        consecutive_5xx_errors: o
            .consecutive_5xx_errors
            .or_else(|| o.consecutive_errors.and_then(|v| u32::try_from(v).ok()))
            .unwrap_or(defaults.consecutive_5xx_errors),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval_ms: duration_field(
            o.interval.as_ref(),
            "outlierDetection.interval",
            owner,
            warnings,
        )
        .filter(|ms| *ms > 0)
        .unwrap_or(defaults.interval_ms),
        base_ejection_time_ms: duration_field(
            o.base_ejection_time.as_ref(),
            "outlierDetection.baseEjectionTime",
            owner,
            warnings,
        )
        .filter(|ms| *ms > 0)
        .unwrap_or(defaults.base_ejection_time_ms),
        max_ejection_percent: percent(o.max_ejection_percent, defaults.max_ejection_percent),
        min_health_percent: percent(o.min_health_percent, defaults.min_health_percent),
    }
}

fn client_tls(tls: &ClientTlsSettings) -> ClientTls {
    ClientTls {
        mode: match tls.mode {
            Some(DrTlsMode::Simple) => TlsMode::Simple,
            Some(DrTlsMode::Mutual) => TlsMode::Mutual,
            Some(DrTlsMode::IstioMutual) => TlsMode::IstioMutual,
            Some(DrTlsMode::Disable) | None => TlsMode::Disable,
        },
        sni: tls.sni.clone(),
        subject_alt_names: tls.subject_alt_names.clone(),
        ca_certificates: tls.ca_certificates.clone(),
        client_certificate: tls.client_certificate.clone(),
        private_key: tls.private_key.clone(),
        credential_name: tls.credential_name.clone(),
        insecure_skip_verify: tls.insecure_skip_verify.unwrap_or(false),
    }
}
