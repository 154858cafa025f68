//! The rule plan: a pure function from [`CaptureConfig`] to the `nat` (and, for IPv6 the proxy
//! does not capture, `filter`) table rules, rendered as `iptables-restore --noflush` input, in
//! istio-iptables' layout with `TRELLIS_` chain names.
//!
//! Applying is made idempotent and atomic by reconciling against the tables' current
//! `iptables-save` text: our chains are declared (which creates them, or flushes them if they
//! exist) and refilled, jumps into them from the built-in chains are added only when missing, and
//! anything of ours the new plan no longer wants is removed — all in one restore transaction.

use std::fmt::Write as _;

use trellis_config::wellknown::{INBOUND_PASSTHROUGH_SOURCE_V4, INBOUND_PASSTHROUGH_SOURCE_V6};

use crate::config::{CaptureConfig, CidrSelection, ConfigError, IpCidr, Ipv6Mode, PortSelection};

/// Entry point for inbound TCP, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
/// Redirects to the inbound capture listener.
pub const IN_REDIRECT_CHAIN: &str = "TRELLIS_IN_REDIRECT";
/// Entry point for locally originated TCP, jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// Redirects to the outbound capture listener.
pub const REDIRECT_CHAIN: &str = "TRELLIS_REDIRECT";
/// `filter` chain rejecting arriving IPv6 the proxy does not capture, jumped to from `INPUT`.
pub const REJECT_INBOUND_CHAIN: &str = "TRELLIS_REJECT_INBOUND";
/// `filter` chain rejecting departing IPv6 the proxy does not capture, jumped to from `OUTPUT`.
pub const REJECT_OUTPUT_CHAIN: &str = "TRELLIS_REJECT_OUTPUT";
/// Every chain trellis-init may create, in its table; cleanup removes exactly these and the jumps
/// into them.
pub const OWNED_CHAINS: [(Table, &str); 6] = [
    (Table::Nat, INBOUND_CHAIN),
    (Table::Nat, IN_REDIRECT_CHAIN),
    (Table::Nat, OUTPUT_CHAIN),
    (Table::Nat, REDIRECT_CHAIN),
    (Table::Filter, REJECT_INBOUND_CHAIN),
    (Table::Filter, REJECT_OUTPUT_CHAIN),
];

/// The tables the plan writes to, in the order the restore text lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Redirects to the proxy.
    Nat,
    /// Rejects traffic of a family the proxy does not capture.
    Filter,
}

impl Table {
    const ALL: [Self; 2] = [Self::Nat, Self::Filter];

    pub fn name(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Filter => "filter",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|table| table.name() == name)
    }

    /// Ours among the chains of this table called `name`.
    fn owned_chain(self, name: &str) -> Option<&'static str> {
        OWNED_CHAINS
            .iter()
            .find(|(table, owned)| *table == self && *owned == name)
            .map(|(_, owned)| *owned)
    }
}

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

    /// Source address the proxy binds when it forwards inbound traffic to the app over loopback;
    /// those connections must reach the app rather than loop back into the proxy.
    fn inbound_passthrough_source(self) -> String {
        match self {
            Self::V4 => format!("{INBOUND_PASSTHROUGH_SOURCE_V4}/32"),
            Self::V6 => format!("{INBOUND_PASSTHROUGH_SOURCE_V6}/128"),
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

/// The full capture plan: IPv4 capture, and IPv6 capture or rejection unless the kernel has no
/// IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturePlan {
    families: Vec<FamilyPlan>,
}

impl CapturePlan {
    /// Validates `config` and computes the rules for each family.
    pub fn new(config: &CaptureConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut families = vec![FamilyPlan::capture(config, IpFamily::V4)];
        match config.ipv6 {
            Ipv6Mode::Capture => families.push(FamilyPlan::capture(config, IpFamily::V6)),
            Ipv6Mode::Reject => families.push(FamilyPlan::reject(IpFamily::V6)),
            Ipv6Mode::Absent => {}
        }
        Ok(Self { families })
    }

    pub fn families(&self) -> &[FamilyPlan] {
        &self.families
    }

    /// Whether IPv6 is redirected to the proxy (which then needs `::6` on loopback).
    pub fn captures_ipv6(&self) -> bool {
        self.families
            .iter()
            .any(|plan| plan.family == IpFamily::V6 && plan.redirects)
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

/// A rule added to a built-in `chain` of `table`; `spec` is everything after `-A <chain>`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Jump {
    table: Table,
    chain: &'static str,
    spec: String,
    /// Inserted first in the chain (`-I`) rather than appended: a rejection must come before any
    /// rule that accepts.
    first: bool,
}

/// One of our chains and its rules, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainRules {
    table: Table,
    name: &'static str,
    rules: Vec<String>,
}

/// The rules for one IP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPlan {
    family: IpFamily,
    /// Whether the family's traffic is redirected to the proxy (rather than rejected).
    redirects: bool,
    chains: Vec<ChainRules>,
    /// Jumps from built-in chains into ours; the only rules we add outside our own chains.
    jumps: Vec<Jump>,
}

impl FamilyPlan {
    /// Capture in istio-iptables' order. A chain is created only if something jumps to it.
    fn capture(config: &CaptureConfig, family: IpFamily) -> Self {
        let mut chains = Vec::new();
        let mut jumps = Vec::new();
        let nat = |name, rules| ChainRules {
            table: Table::Nat,
            name,
            rules,
        };
        let nat_jump = |chain, target: &str| Jump {
            table: Table::Nat,
            chain,
            spec: format!("-p tcp -j {target}"),
            first: false,
        };

        let inbound_rules = inbound_rules(config);
        if !inbound_rules.is_empty() {
            chains.push(nat(INBOUND_CHAIN, inbound_rules));
            jumps.push(nat_jump("PREROUTING", INBOUND_CHAIN));
        }
        // Always present: besides inbound capture, the proxy dialling the pod's own address over
        // loopback is sent here (see `output_rules`).
        chains.push(nat(
            IN_REDIRECT_CHAIN,
            vec![format!(
                "-p tcp -j REDIRECT --to-ports {}",
                config.inbound_capture_port
            )],
        ));

        let output_rules = output_rules(config, family);
        let captures_outbound = output_rules
            .iter()
            .any(|rule| rule.ends_with(&format!("-j {REDIRECT_CHAIN}")));
        chains.push(nat(OUTPUT_CHAIN, output_rules));
        if captures_outbound {
            chains.push(nat(
                REDIRECT_CHAIN,
                vec![format!(
                    "-p tcp -j REDIRECT --to-ports {}",
                    config.outbound_capture_port
                )],
            ));
        }
        jumps.push(nat_jump("OUTPUT", OUTPUT_CHAIN));

        Self {
            family,
            redirects: true,
            chains,
            jumps,
        }
    }

    /// Rejection of every packet of `family` but loopback, both ways: what a pod gets for a
    /// family the proxy does not capture (istio-iptables rejects inbound IPv6 likewise; outbound
    /// is rejected too, or the application could reach the network past the proxy).
    fn reject(family: IpFamily) -> Self {
        let reject = |name, interface_match: &str| ChainRules {
            table: Table::Filter,
            name,
            rules: vec![
                format!("{interface_match} lo -j RETURN"),
                "-j REJECT".to_owned(),
            ],
        };
        let jump = |chain, target: &str| Jump {
            table: Table::Filter,
            chain,
            spec: format!("-j {target}"),
            first: true,
        };
        Self {
            family,
            redirects: false,
            chains: vec![
                reject(REJECT_INBOUND_CHAIN, "-i"),
                reject(REJECT_OUTPUT_CHAIN, "-o"),
            ],
            jumps: vec![
                jump("INPUT", REJECT_INBOUND_CHAIN),
                jump("OUTPUT", REJECT_OUTPUT_CHAIN),
            ],
        }
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The restore text for tables that hold none of our rules yet.
    pub fn render(&self) -> String {
        self.restore_text("")
    }

    /// The restore text that turns the tables described by `current_save` (output of
    /// `iptables-save`, or empty) into ones holding exactly this plan, leaving every rule that is
    /// not ours untouched. Running it on tables that already hold this plan leaves identical
    /// tables, so applying twice changes nothing. Tables with nothing to do are left out.
    pub fn restore_text(&self, current_save: &str) -> String {
        let current = SavedTables::parse(current_save);
        Table::ALL
            .into_iter()
            .filter_map(|table| self.table_text(table, current.get(table)))
            .collect()
    }

    fn table_text(&self, table: Table, current: &OwnedState) -> Option<String> {
        let wanted_chains: Vec<&ChainRules> = self
            .chains
            .iter()
            .filter(|chain| chain.table == table)
            .collect();
        let wanted_names: Vec<&str> = wanted_chains.iter().map(|chain| chain.name).collect();
        let stale_chains: Vec<&str> = current
            .chains
            .iter()
            .copied()
            .filter(|name| !wanted_names.contains(name))
            .collect();

        // Existing jumps identical to a wanted one stay where they are; every other jump into our
        // chains (changed, duplicated, or no longer wanted) is deleted.
        let mut missing_jumps: Vec<&Jump> = self
            .jumps
            .iter()
            .filter(|jump| jump.table == table)
            .collect();
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
        if wanted_chains.is_empty() && stale_chains.is_empty() && unwanted_jumps.is_empty() {
            return None;
        }

        let mut text = format!("*{}\n", table.name());
        // In a --noflush restore a chain line creates the chain, or flushes it if it exists.
        for name in wanted_names.iter().chain(&stale_chains) {
            let _ = writeln!(text, ":{name} - [0:0]");
        }
        for jump in unwanted_jumps {
            let _ = writeln!(text, "-D {} {}", jump.chain, jump.spec);
        }
        for name in &stale_chains {
            let _ = writeln!(text, "-X {name}");
        }
        for chain in wanted_chains {
            for rule in &chain.rules {
                let _ = writeln!(text, "-A {} {rule}", chain.name);
            }
        }
        for jump in missing_jumps {
            let action = if jump.first { "-I" } else { "-A" };
            let _ = writeln!(text, "{action} {} {}", jump.chain, jump.spec);
        }
        text.push_str("COMMIT\n");
        Some(text)
    }
}

/// The restore text that removes every chain of ours and every jump into them from the tables
/// described by `current_save`, and nothing else; `None` when none of ours is present, so that
/// cleaning clean tables does not touch them at all.
pub fn cleanup_text(current_save: &str) -> Option<String> {
    let current = SavedTables::parse(current_save);
    let mut text = String::new();
    for table in Table::ALL {
        let owned = current.get(table);
        if owned.chains.is_empty() && owned.jumps.is_empty() {
            continue;
        }
        let _ = writeln!(text, "*{}", table.name());
        // Flush first so that jumps between our own chains do not keep any of them referenced.
        for name in &owned.chains {
            let _ = writeln!(text, ":{name} - [0:0]");
        }
        for jump in &owned.jumps {
            let _ = writeln!(text, "-D {} {}", jump.chain, jump.spec);
        }
        for name in &owned.chains {
            let _ = writeln!(text, "-X {name}");
        }
        text.push_str("COMMIT\n");
    }
    (!text.is_empty()).then_some(text)
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

/// What of ours each table already holds, read from `iptables-save` text.
#[derive(Debug, Default)]
struct SavedTables {
    nat: OwnedState,
    filter: OwnedState,
}

impl SavedTables {
    fn parse(save: &str) -> Self {
        let mut tables = Self::default();
        let mut table = None;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = Table::from_name(name);
            } else if line == "COMMIT" {
                table = None;
            } else if let Some(table) = table {
                tables.get_mut(table).record(table, line);
            }
        }
        tables
    }

    fn get(&self, table: Table) -> &OwnedState {
        match table {
            Table::Nat => &self.nat,
            Table::Filter => &self.filter,
        }
    }

    fn get_mut(&mut self, table: Table) -> &mut OwnedState {
        match table {
            Table::Nat => &mut self.nat,
            Table::Filter => &mut self.filter,
        }
    }
}

/// What of ours one table holds.
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
    /// Notes `line` of `table` if it declares one of our chains or jumps into one.
    fn record(&mut self, table: Table, line: &str) {
        if let Some(declaration) = line.strip_prefix(':') {
            let name = declaration.split_whitespace().next().unwrap_or_default();
            if let Some(owned) = table.owned_chain(name)
                && !self.chains.contains(&owned)
            {
                self.chains.push(owned);
            }
        } else if let Some(rule) = line.strip_prefix("-A ")
            && let Some((chain, spec)) = rule.split_once(' ')
            && table.owned_chain(chain).is_none()
            && targets_owned_chain(table, spec)
        {
            self.jumps.push(SavedRule {
                chain: chain.to_owned(),
                spec: spec.to_owned(),
            });
        }
    }
}

fn targets_owned_chain(table: Table, spec: &str) -> bool {
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    tokens.windows(2).any(|pair| {
        matches!(pair[0], "-j" | "--jump" | "-g" | "--goto") && table.owned_chain(pair[1]).is_some()
    })
}
