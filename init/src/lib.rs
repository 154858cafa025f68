//! Traffic capture: the pure iptables rule plan for a sidecar pod and its executor.
//!
//! [`CaptureConfig`] says what to intercept (Istio's defaults and flag/annotation syntax);
//! [`CapturePlan::new`] turns it into `nat` table rules in istio-iptables' layout (chains
//! `TRELLIS_INBOUND`, `TRELLIS_IN_REDIRECT`, `TRELLIS_OUTPUT`, `TRELLIS_REDIRECT`) for IPv4 and,
//! when the pod has IPv6 addresses ([`SystemExecutor::ipv6_mode`]), for IPv6 — or else `filter`
//! rules rejecting IPv6, never letting it pass uncaptured — without touching the system;
//! [`apply`] and [`cleanup`] put them into, or take them out of, the current network namespace
//! through an [`Executor`], one atomic `iptables-restore` per IP family. The `trellis-init`
//! binary and the `trellis-cni` plugin both drive this crate.

mod config;
mod executor;
mod netns;
mod plan;
pub mod validate;

pub use config::{
    ALWAYS_EXCLUDED_INBOUND_PORTS, CaptureConfig, CidrSelection, ConfigError,
    ISTIO_ENVOY_STATS_PORT, IpCidr, Ipv6Mode, PortSelection, parse_cidr_list, parse_port_list,
};
pub use executor::{Backend, ExecError, Executor, SystemExecutor, apply, cleanup};
pub use plan::{
    CapturePlan, FamilyPlan, IN_REDIRECT_CHAIN, INBOUND_CHAIN, IpFamily, OUTPUT_CHAIN,
    OWNED_CHAINS, REDIRECT_CHAIN, REJECT_INBOUND_CHAIN, REJECT_OUTPUT_CHAIN, Table, cleanup_text,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_text(config: &CaptureConfig) -> String {
        CapturePlan::new(config).expect("valid config").families()[0].render()
    }

    fn rules_of(text: &str, chain: &str) -> Vec<String> {
        let prefix = format!("-A {chain} ");
        text.lines()
            .filter_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }

    #[test]
    fn default_plan_matches_istio_layout() {
        let text = v4_text(&CaptureConfig::default());
        assert_eq!(rules_of(&text, "PREROUTING"), ["-p tcp -j TRELLIS_INBOUND"]);
        assert_eq!(rules_of(&text, "OUTPUT"), ["-p tcp -j TRELLIS_OUTPUT"]);
        assert_eq!(
            rules_of(&text, INBOUND_CHAIN),
            [
                "-p tcp --dport 15000 -j RETURN",
                "-p tcp --dport 15020 -j RETURN",
                "-p tcp --dport 15021 -j RETURN",
                "-p tcp --dport 15090 -j RETURN",
                "-p tcp -j TRELLIS_IN_REDIRECT",
            ]
        );
        assert_eq!(
            rules_of(&text, IN_REDIRECT_CHAIN),
            ["-p tcp -j REDIRECT --to-ports 15006"]
        );
        assert_eq!(
            rules_of(&text, REDIRECT_CHAIN),
            ["-p tcp -j REDIRECT --to-ports 15001"]
        );
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                "-o lo -s 127.0.0.6/32 -j RETURN",
                "-o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j TRELLIS_IN_REDIRECT",
                "-o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-m owner --uid-owner 1337 -j RETURN",
                "-o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j TRELLIS_IN_REDIRECT",
                "-o lo -m owner ! --gid-owner 1337 -j RETURN",
                "-m owner --gid-owner 1337 -j RETURN",
                "-d 127.0.0.1/32 -j RETURN",
                "-j TRELLIS_REDIRECT",
            ]
        );
        assert!(text.starts_with("*nat\n:TRELLIS_INBOUND - [0:0]\n"));
        assert!(text.ends_with("COMMIT\n"));
    }

    /// Each case: a config change, and rules that must (`+`) or must not (`-`) appear, as
    /// `chain rule`.
    #[test]
    fn plan_contents_follow_config() {
        let cases: Vec<(&str, CaptureConfig, &[&str])> = vec![
            (
                "exclude inbound ports",
                CaptureConfig {
                    exclude_inbound_ports: vec![9090, 15021],
                    ..CaptureConfig::default()
                },
                &[
                    "+TRELLIS_INBOUND -p tcp --dport 9090 -j RETURN",
                    "+TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
                ],
            ),
            (
                "include only some inbound ports, dropping excluded ones",
                CaptureConfig {
                    include_inbound_ports: PortSelection::Only(vec![8080, 15020, 9090]),
                    exclude_inbound_ports: vec![9090],
                    ..CaptureConfig::default()
                },
                &[
                    "+TRELLIS_INBOUND -p tcp --dport 8080 -j TRELLIS_IN_REDIRECT",
                    "-TRELLIS_INBOUND -p tcp --dport 15020 -j TRELLIS_IN_REDIRECT",
                    "-TRELLIS_INBOUND -p tcp --dport 9090 -j TRELLIS_IN_REDIRECT",
                    "-TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
                    "-TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN",
                ],
            ),
            (
                "no inbound capture",
                CaptureConfig {
                    include_inbound_ports: PortSelection::Only(vec![]),
                    ..CaptureConfig::default()
                },
                &[
                    "-PREROUTING -p tcp -j TRELLIS_INBOUND",
                    "+TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                    "+OUTPUT -p tcp -j TRELLIS_OUTPUT",
                ],
            ),
            (
                "exclude outbound CIDRs, IPv6 ones skipped in the IPv4 plan",
                CaptureConfig {
                    exclude_outbound_ip_ranges: parse_cidr_list("x", "10.96.0.0/12,fd00::/8")
                        .unwrap(),
                    ..CaptureConfig::default()
                },
                &[
                    "+TRELLIS_OUTPUT -d 10.96.0.0/12 -j RETURN",
                    "-TRELLIS_OUTPUT -d fd00::/8 -j RETURN",
                ],
            ),
            (
                "include only some outbound CIDRs",
                CaptureConfig {
                    include_outbound_ip_ranges: CidrSelection::parse("x", "10.0.0.0/8").unwrap(),
                    ..CaptureConfig::default()
                },
                &[
                    "+TRELLIS_OUTPUT -d 10.0.0.0/8 -j TRELLIS_REDIRECT",
                    "-TRELLIS_OUTPUT -j TRELLIS_REDIRECT",
                ],
            ),
            (
                "no outbound capture drops the unused redirect chain",
                CaptureConfig {
                    include_outbound_ip_ranges: CidrSelection::Only(vec![]),
                    ..CaptureConfig::default()
                },
                &[
                    "-TRELLIS_OUTPUT -j TRELLIS_REDIRECT",
                    "-TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                ],
            ),
            (
                "include outbound ports without IP ranges",
                CaptureConfig {
                    include_outbound_ip_ranges: CidrSelection::Only(vec![]),
                    include_outbound_ports: vec![443],
                    ..CaptureConfig::default()
                },
                &[
                    "+TRELLIS_OUTPUT -p tcp --dport 443 -j TRELLIS_REDIRECT",
                    "+TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                ],
            ),
            (
                "exclude outbound ports",
                CaptureConfig {
                    exclude_outbound_ports: vec![5432],
                    ..CaptureConfig::default()
                },
                &["+TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN"],
            ),
            (
                "capturing loopback keeps the app's lo traffic",
                CaptureConfig {
                    include_outbound_ip_ranges: CidrSelection::parse("x", "127.0.0.0/8").unwrap(),
                    ..CaptureConfig::default()
                },
                &[
                    "-TRELLIS_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                    "+TRELLIS_OUTPUT -d 127.0.0.0/8 -j TRELLIS_REDIRECT",
                ],
            ),
            (
                "custom uid, gid and capture ports",
                CaptureConfig {
                    proxy_uid: 2000,
                    proxy_gid: 3000,
                    inbound_capture_port: 16006,
                    outbound_capture_port: 16001,
                    ..CaptureConfig::default()
                },
                &[
                    "+TRELLIS_OUTPUT -m owner --uid-owner 2000 -j RETURN",
                    "+TRELLIS_OUTPUT -m owner --gid-owner 3000 -j RETURN",
                    "-TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                    "+TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
                    "+TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
                ],
            ),
        ];
        for (name, config, expectations) in cases {
            let text = v4_text(&config);
            for expectation in expectations {
                let (wanted, rule) = expectation.split_at(1);
                let line = format!("-A {rule}");
                assert_eq!(
                    text.lines().any(|l| l == line),
                    wanted == "+",
                    "{name}: {expectation}\n{text}"
                );
            }
        }
    }

    #[test]
    fn ipv6_plan_uses_ipv6_loopback_and_only_ipv6_ranges() {
        let config = CaptureConfig {
            ipv6: Ipv6Mode::Capture,
            exclude_outbound_ip_ranges: parse_cidr_list("x", "10.96.0.0/12,fd00::/8").unwrap(),
            ..CaptureConfig::default()
        };
        let plan = CapturePlan::new(&config).unwrap();
        let families: Vec<IpFamily> = plan.families().iter().map(FamilyPlan::family).collect();
        assert_eq!(families, [IpFamily::V4, IpFamily::V6]);
        assert!(plan.captures_ipv6());
        let v6 = plan.families()[1].render();
        assert!(v6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(v6.contains("-A TRELLIS_OUTPUT -o lo -s ::6/128 -j RETURN\n"));
        assert!(v6.contains("-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!v6.contains("127.0.0.1") && !v6.contains("10.96.0.0"));
        // IPv6 is redirected exactly as IPv4: the same rules once the addresses are swapped.
        let v4 = plan.families()[0].render();
        assert_eq!(
            v6.replace("::6/128", "127.0.0.6/32")
                .replace("::1/128", "127.0.0.1/32")
                .replace("fd00::/8", "10.96.0.0/12"),
            v4
        );
    }

    #[test]
    fn uncaptured_ipv6_is_rejected_except_on_loopback() {
        let plan = CapturePlan::new(&CaptureConfig::default()).unwrap();
        assert!(!plan.captures_ipv6());
        let v6 = &plan.families()[1];
        assert_eq!(v6.family(), IpFamily::V6);
        assert_eq!(
            v6.render(),
            "*filter\n\
             :TRELLIS_REJECT_INBOUND - [0:0]\n\
             :TRELLIS_REJECT_OUTPUT - [0:0]\n\
             -A TRELLIS_REJECT_INBOUND -i lo -j RETURN\n\
             -A TRELLIS_REJECT_INBOUND -j REJECT\n\
             -A TRELLIS_REJECT_OUTPUT -o lo -j RETURN\n\
             -A TRELLIS_REJECT_OUTPUT -j REJECT\n\
             -I INPUT -j TRELLIS_REJECT_INBOUND\n\
             -I OUTPUT -j TRELLIS_REJECT_OUTPUT\n\
             COMMIT\n"
        );
        let absent = CaptureConfig {
            ipv6: Ipv6Mode::Absent,
            ..CaptureConfig::default()
        };
        assert_eq!(
            CapturePlan::new(&absent).unwrap().families().len(),
            1,
            "a kernel without IPv6 gets IPv4 rules only"
        );
    }

    /// `ip6tables-save` of a pod whose IPv6 was rejected, as iptables 1.8.9 prints it.
    const SAVED_IPV6_REJECTED: &str = "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TRELLIS_REJECT_INBOUND - [0:0]
:TRELLIS_REJECT_OUTPUT - [0:0]
-A INPUT -j TRELLIS_REJECT_INBOUND
-A OUTPUT -j TRELLIS_REJECT_OUTPUT
-A TRELLIS_REJECT_INBOUND -i lo -j RETURN
-A TRELLIS_REJECT_INBOUND -j REJECT --reject-with icmp6-port-unreachable
-A TRELLIS_REJECT_OUTPUT -o lo -j RETURN
-A TRELLIS_REJECT_OUTPUT -j REJECT --reject-with icmp6-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
";

    #[test]
    fn switching_ipv6_between_reject_and_capture_replaces_one_with_the_other() {
        let capture = CapturePlan::new(&CaptureConfig {
            ipv6: Ipv6Mode::Capture,
            ..CaptureConfig::default()
        })
        .unwrap();
        let text = capture.families()[1].restore_text(SAVED_IPV6_REJECTED);
        let (nat, filter) = text.split_once("COMMIT\n*filter\n").expect("both tables");
        assert!(
            nat.starts_with("*nat\n:TRELLIS_INBOUND - [0:0]\n"),
            "{text}"
        );
        assert_eq!(
            filter,
            ":TRELLIS_REJECT_INBOUND - [0:0]\n\
             :TRELLIS_REJECT_OUTPUT - [0:0]\n\
             -D INPUT -j TRELLIS_REJECT_INBOUND\n\
             -D OUTPUT -j TRELLIS_REJECT_OUTPUT\n\
             -X TRELLIS_REJECT_INBOUND\n\
             -X TRELLIS_REJECT_OUTPUT\n\
             COMMIT\n"
        );

        let reject = CapturePlan::new(&CaptureConfig::default()).unwrap();
        let again = reject.families()[1].restore_text(SAVED_IPV6_REJECTED);
        assert!(!again.contains("-I ") && !again.contains("-D "), "{again}");
        assert!(!again.contains("*nat"), "nothing to do in nat: {again}");
    }

    #[test]
    fn invalid_config_yields_error_not_plan() {
        let config = CaptureConfig {
            outbound_capture_port: 0,
            ..CaptureConfig::default()
        };
        assert!(matches!(
            CapturePlan::new(&config),
            Err(ConfigError::InvalidPort {
                field: "outbound-capture-port",
                ..
            })
        ));
    }

    /// `iptables-save -t nat` after applying the default plan next to someone else's rules, as
    /// iptables 1.8.9 prints it.
    const SAVED_WITH_DEFAULT_PLAN: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Wed Nov 25 07:44:10 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:OTHER_CHAIN - [0:0]
:TRELLIS_INBOUND - [0:0]
:TRELLIS_IN_REDIRECT - [0:0]
:TRELLIS_OUTPUT - [0:0]
:TRELLIS_REDIRECT - [0:0]
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p udp -m udp --dport 53 -j OTHER_CHAIN
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A OTHER_CHAIN -j RETURN
-A TRELLIS_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRELLIS_OUTPUT -j TRELLIS_REDIRECT
-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Wed Nov 25 07:44:10 2026
";

    #[test]
    fn reapplying_keeps_existing_jumps_and_refills_chains() {
        let plan = CapturePlan::new(&CaptureConfig::default()).unwrap();
        let text = plan.families()[0].restore_text(SAVED_WITH_DEFAULT_PLAN);
        assert_eq!(rules_of(&text, "PREROUTING"), Vec::<String>::new());
        assert_eq!(rules_of(&text, "OUTPUT"), Vec::<String>::new());
        assert!(!text.contains("-D ") && !text.contains("-X "), "{text}");
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            rules_of(&plan.families()[0].render(), OUTPUT_CHAIN)
        );
    }

    #[test]
    fn reapplying_a_changed_plan_removes_what_it_no_longer_wants() {
        let config = CaptureConfig {
            include_inbound_ports: PortSelection::Only(vec![]),
            include_outbound_ip_ranges: CidrSelection::Only(vec![]),
            ..CaptureConfig::default()
        };
        let text =
            CapturePlan::new(&config).unwrap().families()[0].restore_text(SAVED_WITH_DEFAULT_PLAN);
        assert!(text.contains("\n-D PREROUTING -p tcp -j TRELLIS_INBOUND\n"));
        assert!(text.contains("\n-X TRELLIS_INBOUND\n-X TRELLIS_REDIRECT\n"));
        assert!(!text.contains("OTHER_CHAIN"), "{text}");
        assert_eq!(rules_of(&text, "OUTPUT"), Vec::<String>::new());
    }

    #[test]
    fn duplicated_jumps_are_collapsed() {
        let saved = SAVED_WITH_DEFAULT_PLAN.replace(
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n",
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n",
        );
        let text = CapturePlan::new(&CaptureConfig::default())
            .unwrap()
            .families()[0]
            .restore_text(&saved);
        assert_eq!(
            text.matches("-D OUTPUT -p tcp -j TRELLIS_OUTPUT").count(),
            1
        );
        assert_eq!(rules_of(&text, "OUTPUT"), Vec::<String>::new());
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let text = cleanup_text(SAVED_WITH_DEFAULT_PLAN).expect("rules present");
        assert_eq!(
            text,
            "*nat\n\
             :TRELLIS_INBOUND - [0:0]\n\
             :TRELLIS_IN_REDIRECT - [0:0]\n\
             :TRELLIS_OUTPUT - [0:0]\n\
             :TRELLIS_REDIRECT - [0:0]\n\
             -D PREROUTING -p tcp -j TRELLIS_INBOUND\n\
             -D OUTPUT -p tcp -j TRELLIS_OUTPUT\n\
             -X TRELLIS_INBOUND\n\
             -X TRELLIS_IN_REDIRECT\n\
             -X TRELLIS_OUTPUT\n\
             -X TRELLIS_REDIRECT\n\
             COMMIT\n"
        );
        assert_eq!(cleanup_text(""), None, "empty table");
        let other_only = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j OTHER_CHAIN\nCOMMIT\n";
        assert_eq!(cleanup_text(other_only), None, "nothing of ours");
    }

    #[test]
    fn chains_of_our_names_in_other_tables_are_ignored() {
        let saved = "*filter\n:TRELLIS_OUTPUT - [0:0]\n-A OUTPUT -j TRELLIS_OUTPUT\nCOMMIT\n\
                     *mangle\n:TRELLIS_REJECT_INBOUND - [0:0]\nCOMMIT\n";
        assert_eq!(cleanup_text(saved), None);
        assert_eq!(
            cleanup_text(SAVED_IPV6_REJECTED).as_deref(),
            Some(
                "*filter\n\
                 :TRELLIS_REJECT_INBOUND - [0:0]\n\
                 :TRELLIS_REJECT_OUTPUT - [0:0]\n\
                 -D INPUT -j TRELLIS_REJECT_INBOUND\n\
                 -D OUTPUT -j TRELLIS_REJECT_OUTPUT\n\
                 -X TRELLIS_REJECT_INBOUND\n\
                 -X TRELLIS_REJECT_OUTPUT\n\
                 COMMIT\n"
            )
        );
    }
}
