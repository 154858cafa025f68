//! A DestinationRule's admission rules: host, subsets, and the traffic policy at every level
//! (load balancer, locality, connection pool, outlier detection, client TLS, port-level
//! settings).

use std::collections::BTreeSet;

use crate::istio::duration::Minimum;
use crate::istio::host::{is_dns_label, is_wildcard_domain};
use crate::networking::DestinationRuleSpec;
use crate::networking::destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, LoadBalancerSettings, LocalityLbSetting,
    OutlierDetection, PortTrafficPolicy, TlsMode, TrafficPolicy,
};

use super::{Errors, FieldError};

/// Checks a DestinationRule.
pub fn validate_destination_rule(spec: &DestinationRuleSpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if spec.host.is_empty() {
        errors.add("spec.host", "host must not be empty");
    } else if !is_wildcard_domain(&spec.host) {
        errors.add(
            "spec.host",
            format!("{:?} is not a valid host name", spec.host),
        );
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(&mut errors, "spec.trafficPolicy", policy);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if !is_dns_label(&subset.name) {
            errors.add(
                &format!("{path}.name"),
                format!("{:?} is not a valid subset name (a DNS label)", subset.name),
            );
        } else if !names.insert(subset.name.as_str()) {
            errors.add(
                &format!("{path}.name"),
                format!("duplicate subset name {:?}", subset.name),
            );
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(&mut errors, &format!("{path}.trafficPolicy"), policy);
        }
    }
    errors.export_to("spec.exportTo", &spec.export_to);
    errors.0
}

fn traffic_policy(errors: &mut Errors, path: &str, policy: &TrafficPolicy) {
    port_independent_policy(
        errors,
        path,
        policy.load_balancer.as_ref(),
        policy.connection_pool.as_ref(),
        policy.outlier_detection.as_ref(),
        policy.tls.as_ref(),
    );
    let mut ports = BTreeSet::new();
    for (i, port_policy) in policy.port_level_settings.iter().enumerate() {
        port_traffic_policy(
            errors,
            &format!("{path}.portLevelSettings[{i}]"),
            port_policy,
            &mut ports,
        );
    }
    if let Some(tunnel) = &policy.tunnel {
        if tunnel.target_host.is_empty() {
            errors.add(
                &format!("{path}.tunnel.targetHost"),
                "targetHost must not be empty",
            );
        }
        errors.port(
            &format!("{path}.tunnel.targetPort"),
            Some(tunnel.target_port),
        );
        if let Some(protocol) = &tunnel.protocol
            && !matches!(protocol.as_str(), "CONNECT" | "POST")
        {
            errors.add(
                &format!("{path}.tunnel.protocol"),
                format!("{protocol:?} is not CONNECT or POST"),
            );
        }
    }
    if let Some(budget) = &policy.retry_budget {
        errors.percent(&format!("{path}.retryBudget.percent"), budget.percent);
    }
}

fn port_traffic_policy(
    errors: &mut Errors,
    path: &str,
    policy: &PortTrafficPolicy,
    seen: &mut BTreeSet<u32>,
) {
    match policy.port.and_then(|p| p.number) {
        None => errors.add(&format!("{path}.port.number"), "port number is required"),
        Some(number) => {
            errors.port(&format!("{path}.port.number"), Some(number));
            if !seen.insert(number) {
                errors.add(
                    &format!("{path}.port.number"),
                    format!("port {number} has settings twice"),
                );
            }
        }
    }
    port_independent_policy(
        errors,
        path,
        policy.load_balancer.as_ref(),
        policy.connection_pool.as_ref(),
        policy.outlier_detection.as_ref(),
        policy.tls.as_ref(),
    );
}

fn port_independent_policy(
    errors: &mut Errors,
    path: &str,
    load_balancer: Option<&LoadBalancerSettings>,
    connection_pool: Option<&ConnectionPoolSettings>,
    outlier_detection: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = load_balancer {
        load_balancer_settings(errors, &format!("{path}.loadBalancer"), lb);
    }
    if let Some(pool) = connection_pool {
        connection_pool_settings(errors, &format!("{path}.connectionPool"), pool);
    }
    if let Some(outlier) = outlier_detection {
        outlier_detection_settings(errors, &format!("{path}.outlierDetection"), outlier);
    }
    if let Some(tls) = tls {
        client_tls(errors, &format!("{path}.tls"), tls);
    }
}

fn load_balancer_settings(errors: &mut Errors, path: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        errors.add(path, "only one of simple or consistentHash may be set");
    }
    if let Some(hash) = &lb.consistent_hash {
        let hash_path = format!("{path}.consistentHash");
        let keys = [
            hash.http_header_name.is_some(),
            hash.http_cookie.is_some(),
            hash.use_source_ip.is_some(),
            hash.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|set| **set).count() > 1 {
            errors.add(
                &hash_path,
                "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
            );
        }
        if hash.ring_hash.is_some() && hash.maglev.is_some() {
            errors.add(&hash_path, "only one of ringHash or maglev may be set");
        }
        if let Some(cookie) = &hash.http_cookie {
            if cookie.name.is_empty() {
                errors.add(
                    &format!("{hash_path}.httpCookie.name"),
                    "name must not be empty",
                );
            }
            errors.duration_with(
                &format!("{hash_path}.httpCookie.ttl"),
                cookie.ttl.as_ref(),
                Minimum::None,
            );
        }
    }
    if let Some(locality) = &lb.locality_lb_setting {
        locality_lb(errors, &format!("{path}.localityLbSetting"), locality);
    }
    errors.duration(
        &format!("{path}.warmupDurationSecs"),
        lb.warmup_duration_secs.as_ref(),
    );
    if let Some(warmup) = &lb.warmup {
        errors.duration(&format!("{path}.warmup.duration"), Some(&warmup.duration));
        errors.percent(
            &format!("{path}.warmup.minimumPercent"),
            warmup.minimum_percent,
        );
        if let Some(aggression) = warmup.aggression
            && aggression < 1.0
        {
            errors.add(
                &format!("{path}.warmup.aggression"),
                format!("{aggression} must be at least 1"),
            );
        }
    }
}

fn locality_lb(errors: &mut Errors, path: &str, locality: &LocalityLbSetting) {
    if !locality.distribute.is_empty()
        && (!locality.failover.is_empty() || !locality.failover_priority.is_empty())
    {
        errors.add(
            path,
            "only one of distribute or failover/failoverPriority may be set",
        );
    }
    for (i, distribute) in locality.distribute.iter().enumerate() {
        let total: u64 = distribute.to.values().map(|w| u64::from(*w)).sum();
        if total != 100 {
            errors.add(
                &format!("{path}.distribute[{i}].to"),
                format!("the weights add up to {total}, not 100"),
            );
        }
    }
    for (i, failover) in locality.failover.iter().enumerate() {
        if failover.from.is_some() && failover.from == failover.to {
            errors.add(
                &format!("{path}.failover[{i}]"),
                "from and to must be different regions",
            );
        }
    }
}

fn connection_pool_settings(errors: &mut Errors, path: &str, pool: &ConnectionPoolSettings) {
    if let Some(tcp) = &pool.tcp {
        let tcp_path = format!("{path}.tcp");
        errors.non_negative(&format!("{tcp_path}.maxConnections"), tcp.max_connections);
        errors.duration(
            &format!("{tcp_path}.connectTimeout"),
            tcp.connect_timeout.as_ref(),
        );
        errors.duration(
            &format!("{tcp_path}.maxConnectionDuration"),
            tcp.max_connection_duration.as_ref(),
        );
        errors.duration_with(
            &format!("{tcp_path}.idleTimeout"),
            tcp.idle_timeout.as_ref(),
            Minimum::ZeroOrMillisecond,
        );
        if let Some(keepalive) = &tcp.tcp_keepalive {
            errors.duration(
                &format!("{tcp_path}.tcpKeepalive.time"),
                keepalive.time.as_ref(),
            );
            errors.duration(
                &format!("{tcp_path}.tcpKeepalive.interval"),
                keepalive.interval.as_ref(),
            );
        }
    }
    if let Some(http) = &pool.http {
        let http_path = format!("{path}.http");
        for (field, value) in [
            ("http1MaxPendingRequests", http.http1_max_pending_requests),
            ("http2MaxRequests", http.http2_max_requests),
            ("maxRequestsPerConnection", http.max_requests_per_connection),
            ("maxRetries", http.max_retries),
            ("maxConcurrentStreams", http.max_concurrent_streams),
        ] {
            errors.non_negative(&format!("{http_path}.{field}"), value);
        }
        errors.duration(
            &format!("{http_path}.idleTimeout"),
            http.idle_timeout.as_ref(),
        );
    }
}

fn outlier_detection_settings(errors: &mut Errors, path: &str, outlier: &OutlierDetection) {
    errors.non_negative(
        &format!("{path}.consecutiveErrors"),
        outlier.consecutive_errors,
    );
    errors.duration(&format!("{path}.interval"), outlier.interval.as_ref());
    errors.duration(
        &format!("{path}.baseEjectionTime"),
        outlier.base_ejection_time.as_ref(),
    );
    errors.int_percent(
        &format!("{path}.maxEjectionPercent"),
        outlier.max_ejection_percent.map(i64::from),
    );
    errors.int_percent(
        &format!("{path}.minHealthPercent"),
        outlier.min_health_percent.map(i64::from),
    );
}

fn client_tls(errors: &mut Errors, path: &str, tls: &ClientTlsSettings) {
    // As in Istio: MUTUAL needs the client's certificate and key, as files or as a Secret.
    if tls.mode == Some(TlsMode::Mutual) && tls.credential_name.is_none() {
        if tls.client_certificate.is_none() {
            errors.add(
                &format!("{path}.clientCertificate"),
                "clientCertificate is required with mode MUTUAL (or set credentialName)",
            );
        }
        if tls.private_key.is_none() {
            errors.add(
                &format!("{path}.privateKey"),
                "privateKey is required with mode MUTUAL (or set credentialName)",
            );
        }
    }
}
