//! The rule plan: a pure function from [`CaptureConfig`] to the `nat` table rules, rendered as
//! `iptables-restore --noflush` input, in istio-iptables' layout with `TRELLIS_` chain names.
//!
//! Applying is made idempotent and atomic by reconciling against the table's current
//! `iptables-save` text: our chains are declared (which creates them, or flushes them if they
//! exist) and refilled, jumps into them from the built-in chains are added only when missing, and
//! anything of ours the new plan no longer wants is removed — all in one restore transaction.

use std::fmt::Write as _;

use crate::config::{CaptureConfig, CidrSelection, ConfigError, IpCidr, PortSelection};

/// Entry point for inbound TCP, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
/// Redirects to the inbound capture listener.
pub const IN_REDIRECT_CHAIN: &str = "TRELLIS_IN_REDIRECT";
/// Entry point for locally originated TCP, jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// Redirects to the outbound capture listener.
pub const REDIRECT_CHAIN: &str = "TRELLIS_REDIRECT";
/// Every chain trellis-init may create; cleanup removes exactly these and the jumps into them.
pub const OWNED_CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// Which of iptables/ip6tables a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The loopback host, which the app reaches itself on and which must never be captured.
    fn loopback_host(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.1/32",
            Self::V6 => "::1/128",
        }
    }

    /// Source address Istio's proxy binds when it forwards inbound passthrough traffic to the app
    /// over loopback; those connections must reach the app rather than loop back into the proxy.
    fn inbound_passthrough_source(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.6/32",
            Self::V6 => "::6/128",
        }
    }

    fn contains(self, cidr: &IpCidr) -> bool {
        cidr.is_ipv4() == (self == Self::V4)
    }

    /// The restore command the plan text is meant for, as printed in dry runs and golden files.
    pub fn restore_command(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore --noflush",
            Self::V6 => "ip6tables-restore --noflush",
        }
    }
}

/// The full capture plan: one [`FamilyPlan`] for IPv4, and one for IPv6 when enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturePlan {
    families: Vec<FamilyPlan>,
}

impl CapturePlan {
    /// Validates `config` and computes the rules for each enabled family.
    pub fn new(config: &CaptureConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut families = vec![FamilyPlan::new(config, IpFamily::V4)];
        if config.ipv6 {
            families.push(FamilyPlan::new(config, IpFamily::V6));
        }
        Ok(Self { families })
    }

    pub fn families(&self) -> &[FamilyPlan] {
        &self.families
    }

    /// What applying to tables without any of our rules restores, per family, each under a
    /// comment naming its command. Deterministic: the golden files pin this text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for family_plan in &self.families {
            let _ = writeln!(text, "# {}", family_plan.family.restore_command());
            text.push_str(&family_plan.render());
        }
        text
    }
}

/// A rule appended to `chain`; `spec` is everything after `-A <chain>`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    chain: &'static str,
    spec: String,
}

/// One of our chains and its rules, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainRules {
    name: &'static str,
    rules: Vec<String>,
}

/// The `nat` table rules for one IP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPlan {
    family: IpFamily,
    chains: Vec<ChainRules>,
    /// Jumps from built-in chains into ours; the only rules we add outside our own chains.
    jumps: Vec<Rule>,
}

impl FamilyPlan {
    /// Builds the rules in istio-iptables' order. A chain is created only if something jumps to it.
    fn new(config: &CaptureConfig, family: IpFamily) -> Self {
        let mut chains = Vec::new();
        let mut jumps = Vec::new();

        let inbound_rules = inbound_rules(config);
        if !inbound_rules.is_empty() {
            chains.push(ChainRules {
                name: INBOUND_CHAIN,
                rules: inbound_rules,
            });
            jumps.push(Rule {
                chain: "PREROUTING",
                spec: format!("-p tcp -j {INBOUND_CHAIN}"),
            });
        }
        // Always present: besides inbound capture, the proxy dialling the pod's own address over
        // loopback is sent here (see `output_rules`).
        chains.push(ChainRules {
            name: IN_REDIRECT_CHAIN,
            rules: vec![format!(
                "-p tcp -j REDIRECT --to-ports {}",
                config.inbound_capture_port
            )],
        });

        let output_rules = output_rules(config, family);
        let captures_outbound = output_rules
            .iter()
            .any(|rule| rule.ends_with(&format!("-j {REDIRECT_CHAIN}")));
        chains.push(ChainRules {
            name: OUTPUT_CHAIN,
            rules: output_rules,
        });
        if captures_outbound {
            chains.push(ChainRules {
                name: REDIRECT_CHAIN,
                rules: vec![format!(
                    "-p tcp -j REDIRECT --to-ports {}",
                    config.outbound_capture_port
                )],
            });
        }
        jumps.push(Rule {
            chain: "OUTPUT",
            spec: format!("-p tcp -j {OUTPUT_CHAIN}"),
        });

        Self {
            family,
            chains,
            jumps,
        }
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The restore text for a table that holds none of our rules yet.
    pub fn render(&self) -> String {
        self.restore_text("")
    }

    /// The restore text that turns the table described by `current_save` (output of
    /// `iptables-save -t nat`, or empty) into one holding exactly this plan, leaving every rule
    /// that is not ours untouched. Running it on a table that already holds this plan leaves an
    /// identical table, so applying twice changes nothing.
    pub fn restore_text(&self, current_save: &str) -> String {
        let current = OwnedState::parse(current_save);
        let wanted_chains: Vec<&str> = self.chains.iter().map(|chain| chain.name).collect();
        let stale_chains: Vec<&str> = current
            .chains
            .iter()
            .copied()
            .filter(|name| !wanted_chains.contains(name))
            .collect();

        // Existing jumps identical to a wanted one stay where they are; every other jump into our
        // chains (changed, duplicated, or no longer wanted) is deleted.
        let mut missing_jumps: Vec<&Rule> = self.jumps.iter().collect();
        let mut unwanted_jumps = Vec::new();
        for existing in &current.jumps {
            match missing_jumps
                .iter()
                .position(|wanted| wanted.chain == existing.chain && wanted.spec == existing.spec)
            {
                Some(index) => {
                    missing_jumps.remove(index);
                }
                None => unwanted_jumps.push(existing),
            }
        }

        let mut text = String::from("*nat\n");
        // In a --noflush restore a chain line creates the chain, or flushes it if it exists.
        for name in wanted_chains.iter().chain(&stale_chains) {
            let _ = writeln!(text, ":{name} - [0:0]");
        }
        for jump in unwanted_jumps {
            let _ = writeln!(text, "-D {} {}", jump.chain, jump.spec);
        }
        for name in &stale_chains {
            let _ = writeln!(text, "-X {name}");
        }
        for chain in &self.chains {
            for rule in &chain.rules {
                let _ = writeln!(text, "-A {} {rule}", chain.name);
            }
        }
        for jump in missing_jumps {
            let _ = writeln!(text, "-A {} {}", jump.chain, jump.spec);
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// The restore text that removes every chain of ours and every jump into them from the table
/// described by `current_save`, and nothing else; `None` when none of ours is present, so that
/// cleaning a clean table does not touch it at all.
pub fn cleanup_text(current_save: &str) -> Option<String> {
    let current = OwnedState::parse(current_save);
    if current.chains.is_empty() && current.jumps.is_empty() {
        return None;
    }
    let mut text = String::from("*nat\n");
    // Flush first so that jumps between our own chains do not keep any of them referenced.
    for name in &current.chains {
        let _ = writeln!(text, ":{name} - [0:0]");
    }
    for jump in &current.jumps {
        let _ = writeln!(text, "-D {} {}", jump.chain, jump.spec);
    }
    for name in &current.chains {
        let _ = writeln!(text, "-X {name}");
    }
    text.push_str("COMMIT\n");
    Some(text)
}

/// Inbound destination ports excluded whatever the include list says: the proxy's own ports first
/// (fixed order), then the user's.
fn excluded_inbound_ports(config: &CaptureConfig) -> Vec<u16> {
    let mut ports = config.always_excluded_inbound_ports.clone();
    for &port in &config.exclude_inbound_ports {
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

fn inbound_rules(config: &CaptureConfig) -> Vec<String> {
    let excluded = excluded_inbound_ports(config);
    match &config.include_inbound_ports {
        PortSelection::All => excluded
            .iter()
            .map(|port| format!("-p tcp --dport {port} -j RETURN"))
            .chain([format!("-p tcp -j {IN_REDIRECT_CHAIN}")])
            .collect(),
        // Only listed ports reach the chain's redirect, so exclusions need no RETURN rules; an
        // excluded port that is also listed is dropped from the list instead.
        PortSelection::Only(ports) => ports
            .iter()
            .filter(|port| !excluded.contains(port))
            .map(|port| format!("-p tcp --dport {port} -j {IN_REDIRECT_CHAIN}"))
            .collect(),
    }
}

fn output_rules(config: &CaptureConfig, family: IpFamily) -> Vec<String> {
    let loopback = family.loopback_host();
    let mut rules: Vec<String> = config
        .exclude_outbound_ports
        .iter()
        .map(|port| format!("-p tcp --dport {port} -j RETURN"))
        .collect();
    rules.push(format!(
        "-o lo -s {} -j RETURN",
        family.inbound_passthrough_source()
    ));

    // When the app is explicitly asked to capture loopback destinations, Istio keeps the app's
    // loopback traffic flowing into the include rules instead of returning it early.
    let includes_loopback = matches!(
        &config.include_outbound_ip_ranges,
        CidrSelection::Only(ranges) if ranges.iter().any(|cidr| cidr.network().is_loopback())
    );
    for (owner_match, owner) in [
        ("--uid-owner", config.proxy_uid),
        ("--gid-owner", config.proxy_gid),
    ] {
        // The proxy dialling a non-loopback address over lo is the app calling its own service
        // VIP through the proxy (app -> proxy -> own pod IP): hand it to the inbound side so that
        // inbound policy still applies.
        rules.push(format!(
            "-o lo ! -d {loopback} -m owner {owner_match} {owner} -j {IN_REDIRECT_CHAIN}"
        ));
        // The app talking to itself over lo (e.g. via its own pod IP) is not mesh traffic.
        if !includes_loopback {
            rules.push(format!("-o lo -m owner ! {owner_match} {owner} -j RETURN"));
        }
        // Everything else the proxy sends goes where it is addressed; redirecting it would loop.
        rules.push(format!("-m owner {owner_match} {owner} -j RETURN"));
    }
    rules.push(format!("-d {loopback} -j RETURN"));

    for cidr in config
        .exclude_outbound_ip_ranges
        .iter()
        .filter(|cidr| family.contains(cidr))
    {
        rules.push(format!("-d {cidr} -j RETURN"));
    }
    for port in &config.include_outbound_ports {
        rules.push(format!("-p tcp --dport {port} -j {REDIRECT_CHAIN}"));
    }
    match &config.include_outbound_ip_ranges {
        CidrSelection::All => rules.push(format!("-j {REDIRECT_CHAIN}")),
        CidrSelection::Only(ranges) => {
            for cidr in ranges.iter().filter(|cidr| family.contains(cidr)) {
                rules.push(format!("-d {cidr} -j {REDIRECT_CHAIN}"));
            }
        }
    }
    rules
}

/// What of ours a `nat` table already holds, read from `iptables-save` text.
#[derive(Debug, Default)]
struct OwnedState {
    /// Our chains that exist, in save order.
    chains: Vec<&'static str>,
    /// Rules in other chains that jump or go to one of ours.
    jumps: Vec<SavedRule>,
}

/// A rule as `iptables-save` printed it, so that `-D <chain> <spec>` deletes precisely that rule.
#[derive(Debug)]
struct SavedRule {
    chain: String,
    spec: String,
}

impl OwnedState {
    fn parse(save: &str) -> Self {
        let mut state = Self::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if in_nat {
                state.record(line);
            }
        }
        state
    }

    /// Notes `line` of the `nat` table if it declares one of our chains or jumps into one.
    fn record(&mut self, line: &str) {
        if let Some(declaration) = line.strip_prefix(':') {
            let name = declaration.split_whitespace().next().unwrap_or_default();
            if let Some(owned) = owned_chain(name)
                && !self.chains.contains(&owned)
            {
                self.chains.push(owned);
            }
        } else if let Some(rule) = line.strip_prefix("-A ")
            && let Some((chain, spec)) = rule.split_once(' ')
            && owned_chain(chain).is_none()
            && targets_owned_chain(spec)
        {
            self.jumps.push(SavedRule {
                chain: chain.to_owned(),
                spec: spec.to_owned(),
            });
        }
    }
}

fn owned_chain(name: &str) -> Option<&'static str> {
    OWNED_CHAINS.iter().copied().find(|owned| *owned == name)
}

fn targets_owned_chain(spec: &str) -> bool {
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    tokens.windows(2).any(|pair| {
        matches!(pair[0], "-j" | "--jump" | "-g" | "--goto") && owned_chain(pair[1]).is_some()
    })
}
