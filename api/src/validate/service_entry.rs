//! A ServiceEntry's admission rules: hosts and addresses for its resolution, ports, and the
//! endpoints or workload selector.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::istio::host::is_wildcard_domain;
use crate::networking::service_entry::{Resolution, ServiceEntrySpec, WorkloadEntry};

use super::{Errors, FieldError};

/// Checks a ServiceEntry.
pub fn validate_service_entry(spec: &ServiceEntrySpec) -> Vec<FieldError> {
    let mut errors = Errors::default();
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    entry_hosts(&mut errors, &spec.hosts, resolution);
    for (i, address) in spec.addresses.iter().enumerate() {
        errors.subnet(&format!("spec.addresses[{i}]"), address);
    }
    entry_ports(&mut errors, spec);
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        errors.add(
            "spec.workloadSelector",
            "only one of endpoints or workloadSelector may be set",
        );
    }
    match resolution {
        Resolution::Static if spec.endpoints.is_empty() && spec.workload_selector.is_none() => {
            errors.add(
                "spec.endpoints",
                "resolution STATIC needs endpoints or a workloadSelector",
            );
        }
        Resolution::None if !spec.endpoints.is_empty() => errors.add(
            "spec.endpoints",
            "resolution NONE takes no endpoints (connections go where the client asked)",
        ),
        Resolution::DnsRoundRobin if spec.endpoints.len() > 1 => errors.add(
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN takes at most one endpoint",
        ),
        _ => {}
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        entry_endpoint(
            &mut errors,
            &format!("spec.endpoints[{i}]"),
            endpoint,
            spec,
            resolution,
        );
    }
    errors.export_to("spec.exportTo", &spec.export_to);
    errors.0
}

fn entry_hosts(errors: &mut Errors, hosts: &[String], resolution: Resolution) {
    if hosts.is_empty() {
        errors.add("spec.hosts", "at least one host is required");
    }
    let resolved_by_dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
    for (i, host) in hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if host.is_empty() {
            errors.add(&path, "host must not be empty");
        } else if host == "*" || !is_wildcard_domain(host) {
            errors.add(&path, format!("{host:?} is not a valid host name"));
        } else if host.contains('*') && resolved_by_dns {
            errors.add(
                &path,
                format!("wildcard host {host:?} cannot be resolved with DNS resolution"),
            );
        }
    }
}

/// Port numbers in range, and numbers and names unique (they key the entry's listeners).
fn entry_ports(errors: &mut Errors, spec: &ServiceEntrySpec) {
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        errors.port(&format!("{path}.number"), Some(port.number));
        errors.port(&format!("{path}.targetPort"), port.target_port);
        if !numbers.insert(port.number) {
            let message = format!("port {} is listed twice", port.number);
            errors.add(&format!("{path}.number"), message);
        }
        if port.name.is_empty() {
            errors.add(&format!("{path}.name"), "name must not be empty");
        } else if !names.insert(port.name.as_str()) {
            let message = format!("port name {:?} is listed twice", port.name);
            errors.add(&format!("{path}.name"), message);
        }
    }
}

fn entry_endpoint(
    errors: &mut Errors,
    path: &str,
    endpoint: &WorkloadEntry,
    spec: &ServiceEntrySpec,
    resolution: Resolution,
) {
    let address_path = format!("{path}.address");
    match endpoint.address.as_deref() {
        None | Some("") if endpoint.network.is_none() => {
            errors.add(&address_path, "address is required")
        }
        Some(address)
            if resolution == Resolution::Static
                && !address.starts_with("unix://")
                && address.parse::<IpAddr>().is_err() =>
        {
            let message = format!("{address:?} is not an IP address (resolution STATIC)");
            errors.add(&address_path, message)
        }
        Some(address)
            if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
                && address.parse::<IpAddr>().is_err()
                && !is_wildcard_domain(address) =>
        {
            let message = format!("{address:?} is not a host name or IP address");
            errors.add(&address_path, message)
        }
        _ => {}
    }
    for (name, port) in &endpoint.ports {
        let port_path = format!("{path}.ports.{name}");
        errors.port(&port_path, Some(*port));
        if !spec.ports.iter().any(|p| &p.name == name) {
            let message = format!("{name:?} is not the name of a port of the ServiceEntry");
            errors.add(&port_path, message);
        }
    }
}
