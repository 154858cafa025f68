//! ServiceEntry → services: each visible entry's hosts become services (VIPs, ports,
//! `STATIC` endpoints or the pods its `workloadSelector` picks) or DNS-resolved external
//! services; a host a Kubernetes Service already has stays the Service's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kube::ResourceExt;
use trellis_api::istio::export_to::exported_to;
use trellis_api::networking::ServiceEntry;
use trellis_api::networking::service_entry::{Location as SeLocation, Resolution as SeResolution};
use trellis_config::SpiffeId;
use trellis_config::proxy::{Endpoint, Protocol, Service, ServicePort};
use trellis_config::traffic::{DnsEndpoint, ExternalService, Location, Resolution};

use crate::compile::is_meshed;

use super::{TrafficInputs, creation_key, describe, fqdn, port_u16};

pub(super) fn service_entries(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    warnings: &mut Vec<String>,
) -> (Vec<Service>, Vec<ExternalService>) {
    let known: BTreeSet<&str> = inputs
        .services
        .iter()
        .flat_map(|s| s.hostnames.iter().map(String::as_str))
        .collect();
    let mut entries: Vec<&ServiceEntry> = inputs
        .service_entries
        .iter()
        .filter(|se| {
            exported_to(
                &se.spec.export_to,
                se.namespace().as_deref().unwrap_or_default(),
                namespace,
            )
        })
        .collect();
    entries.sort_by_key(|se| creation_key(*se));
    let mut services: Vec<Service> = Vec::new();
    let mut external = Vec::new();
    for entry in entries {
        let owner = describe("ServiceEntry", entry);
        for host in &entry.spec.hosts {
            if known.contains(host.as_str()) || services.iter().any(|s| fqdn(s) == host) {
                warnings.push(format!(
                    "{owner}: host {host} is already defined (a Service or an older ServiceEntry wins)"
                ));
                continue;
            }
            if let Some((service, facts)) =
                service_entry_host(inputs, entry, host, &owner, warnings)
            {
                services.push(service);
                external.push(facts);
            }
        }
    }
    (services, external)
}

fn service_entry_host(
    inputs: &TrafficInputs<'_>,
    entry: &ServiceEntry,
    host: &str,
    owner: &str,
    warnings: &mut Vec<String>,
) -> Option<(Service, ExternalService)> {
    let spec = &entry.spec;
    let namespace = entry.namespace().unwrap_or_default();
    let mut ignored: Vec<&str> = Vec::new();
    if !spec.subject_alt_names.is_empty() {
        ignored.push("subjectAltNames");
    }
    if spec
        .endpoints
        .iter()
        .any(|e| e.network.is_some() || e.locality.is_some())
    {
        ignored.push("endpoints[].network/locality");
    }
    if spec.endpoints.iter().any(|e| e.weight.is_some()) {
        ignored.push("endpoints[].weight");
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "{owner}: not supported, ignored: {}",
            ignored.join(", ")
        ));
    }
    let location = match spec.location {
        Some(SeLocation::MeshInternal) => Location::MeshInternal,
        Some(SeLocation::MeshExternal) | None => Location::MeshExternal,
    };
    let resolution = match spec.resolution {
        Some(SeResolution::Static) => Resolution::Static,
        Some(SeResolution::Dns) => Resolution::Dns,
        Some(SeResolution::DnsRoundRobin) => Resolution::DnsRoundRobin,
        Some(SeResolution::None) | None => Resolution::None,
    };
    let mut vips = Vec::new();
    for address in &spec.addresses {
        let single = address
            .strip_suffix("/32")
            .or_else(|| address.strip_suffix("/128"))
            .unwrap_or(address);
        match single.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip),
            Err(_) => warnings.push(format!(
                "{owner}: address {address} ignored (only single addresses can be VIPs)"
            )),
        }
    }
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .filter_map(|port| {
            let number = port_u16(port.number)?;
            // The endpoints' own port for this name, when every STATIC endpoint agrees on one.
            let endpoint_ports: BTreeSet<u32> = spec
                .endpoints
                .iter()
                .filter_map(|e| e.ports.get(&port.name).copied())
                .collect();
            let target = match (endpoint_ports.len(), port.target_port) {
                (1, _) => endpoint_ports.first().copied().and_then(port_u16),
                (_, Some(target)) => port_u16(target),
                _ => Some(number),
            };
            if endpoint_ports.len() > 1 {
                warnings.push(format!(
                    "{owner}: endpoints map port {} to different ports; using the port's targetPort",
                    port.name
                ));
            }
            let protocol = port.protocol.as_deref().map(str::to_ascii_lowercase);
            Some(ServicePort {
                name: port.name.clone(),
                port: number,
                target_port: target.unwrap_or(number),
                protocol: Protocol::from_port(&port.name, protocol.as_deref()),
            })
        })
        .collect();
    if ports.is_empty() {
        warnings.push(format!("{owner}: host {host} has no valid port; skipped"));
        return None;
    }
    let mut endpoints = Vec::new();
    let mut dns_endpoints = Vec::new();
    let identity = |service_account: &str| {
        SpiffeId::new(inputs.trust_domain, &namespace, service_account).to_string()
    };
    for workload in &spec.endpoints {
        let Some(address) = workload.address.as_deref() else {
            continue;
        };
        match resolution {
            Resolution::Static => match address.parse::<IpAddr>() {
                Ok(ip) => {
                    let meshed =
                        location == Location::MeshInternal && workload.service_account.is_some();
                    endpoints.push(Endpoint {
                        address: ip,
                        ready: true,
                        meshed,
                        identity: workload
                            .service_account
                            .as_deref()
                            .filter(|_| meshed)
                            .map(identity),
                        labels: (&workload.labels).into(),
                        plaintext_ports: BTreeSet::new(),
                    });
                }
                Err(_) => warnings.push(format!(
                    "{owner}: STATIC endpoint {address} is not an IP address; skipped"
                )),
            },
            Resolution::Dns | Resolution::DnsRoundRobin => dns_endpoints.push(DnsEndpoint {
                address: address.to_owned(),
                ports: workload
                    .ports
                    .iter()
                    .filter_map(|(name, port)| Some((name.clone(), port_u16(*port)?)))
                    .collect(),
                labels: workload.labels.clone(),
            }),
            Resolution::None => {}
        }
    }
    if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) && dns_endpoints.is_empty()
    {
        dns_endpoints.push(DnsEndpoint {
            address: host.to_owned(),
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
        });
    }
    if let Some(selector) = spec
        .workload_selector
        .as_ref()
        .filter(|s| !s.labels.is_empty())
    {
        endpoints.extend(selected_pods(inputs, &namespace, &selector.labels));
    }
    endpoints.sort_by_key(|e| e.address);
    endpoints.dedup_by(|a, b| a.address == b.address);
    Some((
        Service {
            hostnames: vec![host.to_owned()],
            namespace: namespace.clone(),
            vips,
            ports,
            endpoints,
        },
        ExternalService {
            host: host.to_owned(),
            location,
            resolution,
            dns_endpoints,
        },
    ))
}

/// Pods of `namespace` carrying every selector label, as endpoints.
fn selected_pods(
    inputs: &TrafficInputs<'_>,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<Endpoint> {
    inputs
        .pods
        .iter()
        .filter(|pod| pod.metadata.namespace.as_deref() == Some(namespace))
        .filter(|pod| {
            let labels = pod.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter_map(|pod| {
            let address = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            let meshed = is_meshed(pod);
            let service_account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_none_or(|c| c.status == "True");
            Some(Endpoint {
                address,
                ready,
                meshed,
                identity: meshed.then(|| {
                    SpiffeId::new(inputs.trust_domain, namespace, service_account).to_string()
                }),
                labels: pod
                    .metadata
                    .labels
                    .as_ref()
                    .map(Into::into)
                    .unwrap_or_default(),
                plaintext_ports: BTreeSet::new(),
            })
        })
        .collect()
}
