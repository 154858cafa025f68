//! Capture parameters: which traffic the sidecar intercepts and which it leaves alone, parsed from
//! the same comma-separated forms that istio-iptables flags and Istio's
//! `traffic.sidecar.istio.io/*` annotations use, and validated before any rule is built.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use trellis_config::wellknown;

/// Port Istio's Envoy serves its own Prometheus stats on. Trellis does not listen there, but Istio
/// excludes it from inbound capture and scrape configs written for Istio may still target it, so
/// it stays excluded: a scrape must reach whoever listens, never loop into the inbound listener.
pub const ISTIO_ENVOY_STATS_PORT: u16 = 15090;

/// Ports the proxy itself serves to the outside; redirecting them to the inbound listener would
/// make the proxy's own health and metrics endpoints unreachable.
pub const ALWAYS_EXCLUDED_INBOUND_PORTS: [u16; 4] = [
    wellknown::ADMIN_PORT,
    wellknown::METRICS_PORT,
    wellknown::READINESS_PORT,
    ISTIO_ENVOY_STATS_PORT,
];

/// Everything the rule plan is computed from. `Default` is what Istio's injector asks of
/// istio-iptables for a sidecar without capture annotations: capture all inbound and all outbound
/// TCP, exempt the proxy's uid/gid 1337.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Owner of the proxy's sockets; its traffic is never sent back into the proxy.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Listener that receives redirected inbound connections.
    pub inbound_capture_port: u16,
    /// Listener that receives redirected outbound connections.
    pub outbound_capture_port: u16,
    /// Destination ports of inbound connections to redirect; `Only(vec![])` disables inbound capture.
    pub include_inbound_ports: PortSelection,
    /// Inbound destination ports to leave alone, on top of [`Self::always_excluded_inbound_ports`].
    pub exclude_inbound_ports: Vec<u16>,
    /// The proxy's own externally reachable ports, excluded whatever the other settings say.
    pub always_excluded_inbound_ports: Vec<u16>,
    /// Outbound destination ports redirected regardless of destination IP (Istio's
    /// `includeOutboundPorts`), for when only some IP ranges are captured.
    pub include_outbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ranges to redirect; `Only(vec![])` captures no range.
    pub include_outbound_ip_ranges: CidrSelection,
    /// Outbound destination ranges never redirected; take precedence over the includes.
    pub exclude_outbound_ip_ranges: Vec<IpCidr>,
    /// What the IPv6 tables do: capture IPv6 as IPv4 is captured, or reject it.
    pub ipv6: Ipv6Mode,
}

/// What happens to a pod's IPv6 traffic. Never "let it pass": the proxy sees only what the rules
/// redirect to it, so uncaptured IPv6 would reach the application (and leave the pod) without
/// mTLS, policy or telemetry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// The pod has IPv6 addresses: ip6tables redirects IPv6 to the proxy exactly as iptables does
    /// IPv4, with `::1` for loopback and `::6` as the inbound passthrough's source.
    Capture,
    /// The pod has no IPv6 address of its own (at most link-local ones): every IPv6 packet but
    /// loopback is rejected in the `filter` table, as istio-iptables does where it does not
    /// capture IPv6, so a neighbour reaching the pod's link-local address meets no application.
    #[default]
    Reject,
    /// The kernel has no IPv6 at all: there is no IPv6 traffic and no ip6tables to program.
    Absent,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            proxy_uid: wellknown::PROXY_UID,
            proxy_gid: wellknown::PROXY_GID,
            inbound_capture_port: wellknown::INBOUND_CAPTURE_PORT,
            outbound_capture_port: wellknown::OUTBOUND_CAPTURE_PORT,
            include_inbound_ports: PortSelection::All,
            exclude_inbound_ports: Vec::new(),
            always_excluded_inbound_ports: ALWAYS_EXCLUDED_INBOUND_PORTS.to_vec(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_ip_ranges: CidrSelection::All,
            exclude_outbound_ip_ranges: Vec::new(),
            ipv6: Ipv6Mode::default(),
        }
    }
}

impl CaptureConfig {
    /// Checks what the types alone cannot: port 0 (which iptables would reject mid-restore) and
    /// capture ports that would make the proxy's listeners collide or capture each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_port("inbound-capture-port", self.inbound_capture_port)?;
        check_port("outbound-capture-port", self.outbound_capture_port)?;
        if self.inbound_capture_port == self.outbound_capture_port {
            return Err(ConfigError::CapturePortsCollide(self.inbound_capture_port));
        }
        if let PortSelection::Only(ports) = &self.include_inbound_ports {
            check_ports("include-inbound-ports", ports)?;
        }
        check_ports("exclude-inbound-ports", &self.exclude_inbound_ports)?;
        check_ports(
            "always-excluded-inbound-ports",
            &self.always_excluded_inbound_ports,
        )?;
        check_ports("include-outbound-ports", &self.include_outbound_ports)?;
        check_ports("exclude-outbound-ports", &self.exclude_outbound_ports)?;
        Ok(())
    }
}

fn check_port(field: &'static str, port: u16) -> Result<(), ConfigError> {
    if port == 0 {
        return Err(ConfigError::InvalidPort {
            field,
            value: "0".to_owned(),
        });
    }
    Ok(())
}

fn check_ports(field: &'static str, ports: &[u16]) -> Result<(), ConfigError> {
    ports.iter().try_for_each(|&port| check_port(field, port))
}

/// Why a capture parameter was rejected. `field` names the flag (and annotation) it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: invalid port {value:?}, expected a number from 1 to 65535")]
    InvalidPort { field: &'static str, value: String },
    #[error("{field}: invalid CIDR {value:?}: {reason}")]
    InvalidCidr {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field}: `*` means everything and cannot be combined with other entries")]
    WildcardMixed { field: &'static str },
    #[error("{field}: empty entry in {value:?}")]
    EmptyEntry { field: &'static str, value: String },
    #[error("inbound and outbound capture ports are both {0}; the proxy needs two listeners")]
    CapturePortsCollide(u16),
}

/// A set of ports that is either everything (`*`) or an explicit list (possibly empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSelection {
    All,
    Only(Vec<u16>),
}

impl PortSelection {
    /// Parses `*`, an empty string (nothing), or a comma-separated port list.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, ConfigError> {
        match parse_wildcard_or_list(field, text, parse_port)? {
            None => Ok(Self::All),
            Some(ports) => Ok(Self::Only(ports)),
        }
    }
}

/// A set of destination ranges that is either everything (`*`) or an explicit list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidrSelection {
    All,
    Only(Vec<IpCidr>),
}

impl CidrSelection {
    /// Parses `*`, an empty string (nothing), or a comma-separated CIDR list.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, ConfigError> {
        match parse_wildcard_or_list(field, text, IpCidr::parse_field)? {
            None => Ok(Self::All),
            Some(ranges) => Ok(Self::Only(ranges)),
        }
    }
}

/// Parses a comma-separated port list; an empty string is the empty list.
pub fn parse_port_list(field: &'static str, text: &str) -> Result<Vec<u16>, ConfigError> {
    parse_list(field, text, parse_port)
}

/// Parses a comma-separated CIDR list; an empty string is the empty list.
pub fn parse_cidr_list(field: &'static str, text: &str) -> Result<Vec<IpCidr>, ConfigError> {
    parse_list(field, text, IpCidr::parse_field)
}

/// `None` is the wildcard `*`; otherwise the parsed list.
fn parse_wildcard_or_list<T: PartialEq>(
    field: &'static str,
    text: &str,
    parse_item: fn(&'static str, &str) -> Result<T, ConfigError>,
) -> Result<Option<Vec<T>>, ConfigError> {
    let entries = split_entries(text);
    if entries.contains(&"*") {
        return if entries.len() == 1 {
            Ok(None)
        } else {
            Err(ConfigError::WildcardMixed { field })
        };
    }
    parse_list(field, text, parse_item).map(Some)
}

/// Parses each entry and drops repeats, keeping first-seen order so the rules follow the order
/// the user wrote (as istio-iptables does) while never emitting the same rule twice.
fn parse_list<T: PartialEq>(
    field: &'static str,
    text: &str,
    parse_item: fn(&'static str, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    let mut items = Vec::new();
    for entry in split_entries(text) {
        if entry.is_empty() {
            return Err(ConfigError::EmptyEntry {
                field,
                value: text.to_owned(),
            });
        }
        let item = parse_item(field, entry)?;
        if !items.contains(&item) {
            items.push(item);
        }
    }
    Ok(items)
}

/// Splits on commas, trimming blanks around entries; a blank string is no entries at all.
fn split_entries(text: &str) -> Vec<&str> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    text.split(',').map(str::trim).collect()
}

fn parse_port(field: &'static str, text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ConfigError::InvalidPort {
            field,
            value: text.to_owned(),
        }),
    }
}

/// An IPv4 or IPv6 network in CIDR notation, stored with host bits cleared so that the rendered
/// rule is exactly what `iptables-save` prints back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpCidr {
    network: IpAddr,
    prefix_len: u8,
}

impl IpCidr {
    /// Builds the network containing `addr`; fails if the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, String> {
        let network = match addr {
            IpAddr::V4(v4) if prefix_len <= 32 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) if prefix_len <= 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            IpAddr::V4(_) => return Err(format!("prefix length {prefix_len} exceeds 32")),
            IpAddr::V6(_) => return Err(format!("prefix length {prefix_len} exceeds 128")),
        };
        Ok(Self {
            network,
            prefix_len,
        })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    fn parse_field(field: &'static str, text: &str) -> Result<Self, ConfigError> {
        text.parse().map_err(|reason| ConfigError::InvalidCidr {
            field,
            value: text.to_owned(),
            reason,
        })
    }
}

impl FromStr for IpCidr {
    type Err = String;

    /// Accepts `addr/len`, or a bare address meaning that single host.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{addr_text:?} is not an IP address"))?;
        let prefix_len = match prefix_text {
            Some(prefix) => prefix
                .parse::<u8>()
                .map_err(|_| format!("{prefix:?} is not a prefix length"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Self::new(addr, prefix_len)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_selection_parsing() {
        let cases: &[(&str, Result<PortSelection, ConfigError>)] = &[
            ("*", Ok(PortSelection::All)),
            (" * ", Ok(PortSelection::All)),
            ("", Ok(PortSelection::Only(vec![]))),
            ("80", Ok(PortSelection::Only(vec![80]))),
            ("80, 443,80", Ok(PortSelection::Only(vec![80, 443]))),
            ("65535", Ok(PortSelection::Only(vec![65535]))),
            (
                "0",
                Err(ConfigError::InvalidPort {
                    field: "f",
                    value: "0".into(),
                }),
            ),
            (
                "65536",
                Err(ConfigError::InvalidPort {
                    field: "f",
                    value: "65536".into(),
                }),
            ),
            (
                "80,http",
                Err(ConfigError::InvalidPort {
                    field: "f",
                    value: "http".into(),
                }),
            ),
            (
                "-1",
                Err(ConfigError::InvalidPort {
                    field: "f",
                    value: "-1".into(),
                }),
            ),
            (
                "8000:9000",
                Err(ConfigError::InvalidPort {
                    field: "f",
                    value: "8000:9000".into(),
                }),
            ),
            (
                "80,,443",
                Err(ConfigError::EmptyEntry {
                    field: "f",
                    value: "80,,443".into(),
                }),
            ),
            ("*,80", Err(ConfigError::WildcardMixed { field: "f" })),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &PortSelection::parse("f", input),
                expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn cidr_parsing_normalises_and_rejects_bad_syntax() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
            ("10.1.2.3/8", Ok("10.0.0.0/8")),
            ("10.1.2.3", Ok("10.1.2.3/32")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("fd00::1/8", Ok("fd00::/8")),
            ("2001:db8::1", Ok("2001:db8::1/128")),
            ("::/0", Ok("::/0")),
            ("10.0.0.0/33", Err(())),
            ("fd00::/129", Err(())),
            ("10.0.0/8", Err(())),
            ("10.0.0.0/", Err(())),
            ("10.0.0.0/-1", Err(())),
            ("example.com/8", Err(())),
            ("", Err(())),
        ];
        for (input, expected) in cases {
            let parsed = input.parse::<IpCidr>().map(|cidr| cidr.to_string());
            match expected {
                Ok(text) => assert_eq!(parsed.as_deref(), Ok(*text), "input {input:?}"),
                Err(()) => assert!(parsed.is_err(), "input {input:?} parsed as {parsed:?}"),
            }
        }
    }

    #[test]
    fn cidr_list_errors_name_the_field_and_value() {
        let err = CidrSelection::parse("include-outbound-ip-ranges", "10.0.0.0/8,10.0.0.0/40")
            .unwrap_err();
        assert!(matches!(
            &err,
            ConfigError::InvalidCidr { field: "include-outbound-ip-ranges", value, .. }
                if value == "10.0.0.0/40"
        ));
        assert_eq!(
            CidrSelection::parse("f", "*"),
            Ok(CidrSelection::All),
            "wildcard"
        );
        assert_eq!(
            parse_cidr_list("f", "10.0.0.0/8, 10.0.0.0/8"),
            Ok(vec!["10.0.0.0/8".parse().unwrap()]),
            "repeats collapse"
        );
        assert_eq!(parse_port_list("f", " "), Ok(vec![]), "blank is empty");
    }

    #[test]
    fn validate_rejects_what_iptables_would_reject_mid_restore() {
        let cases: &[(&str, CaptureConfig, Option<ConfigError>)] = &[
            ("defaults", CaptureConfig::default(), None),
            (
                "zero inbound capture port",
                CaptureConfig {
                    inbound_capture_port: 0,
                    ..CaptureConfig::default()
                },
                Some(ConfigError::InvalidPort {
                    field: "inbound-capture-port",
                    value: "0".into(),
                }),
            ),
            (
                "same capture ports",
                CaptureConfig {
                    outbound_capture_port: 15006,
                    ..CaptureConfig::default()
                },
                Some(ConfigError::CapturePortsCollide(15006)),
            ),
            (
                "zero in an exclude list built in code",
                CaptureConfig {
                    exclude_outbound_ports: vec![443, 0],
                    ..CaptureConfig::default()
                },
                Some(ConfigError::InvalidPort {
                    field: "exclude-outbound-ports",
                    value: "0".into(),
                }),
            ),
            (
                "zero in an include list built in code",
                CaptureConfig {
                    include_inbound_ports: PortSelection::Only(vec![0]),
                    ..CaptureConfig::default()
                },
                Some(ConfigError::InvalidPort {
                    field: "include-inbound-ports",
                    value: "0".into(),
                }),
            ),
        ];
        for (name, config, expected) in cases {
            assert_eq!(
                config.validate().err().as_ref(),
                expected.as_ref(),
                "{name}"
            );
        }
    }
}
