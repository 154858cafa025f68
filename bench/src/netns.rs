//! The private network namespace every benchmark runs in, with the capture rules a sidecar
//! would have. Addresses (all loopback, all inside the namespace):
//!
//! - `127.0.0.2` — the backend, dialled directly (the baseline);
//! - `127.0.0.3` — the backend behind one proxy: REDIRECT to the outbound listener (15001);
//! - `127.0.0.4` — the backend behind two proxies: REDIRECT to 15001, and the outbound proxy's
//!   own connection (uid 1337) REDIRECTed again to the inbound listener (15006), except the
//!   inbound proxy's connection to the app, which leaves from 127.0.0.6 as in Istio;
//! - `127.0.0.5` — the mesh path: captured like `127.0.0.4`, with mutual TLS between the two
//!   proxies (the address is a meshed endpoint in trellis-proxy's config; Envoy's outbound
//!   cluster originates TLS for it).

use std::process::Command;

use anyhow::Result;

use crate::procs::run;

pub const PROXY_UID: &str = "1337";
const PREFIX: &str = "trellis-bench-";

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// The load benchmark's namespace: loopback and the capture rules.
    pub fn create() -> Result<Self> {
        Self::create_named("", &RULES)
    }

    /// A namespace with loopback only (the control-plane benchmark's private cluster).
    pub fn create_plain(kind: &str) -> Result<Self> {
        Self::create_named(&format!("{kind}-"), &[])
    }

    fn create_named(kind: &str, rules: &[&str]) -> Result<Self> {
        remove_stale();
        let name = format!("{PREFIX}{kind}{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.exec("ip", &["link", "set", "lo", "up"])?;
        for rule in rules {
            let mut args = vec!["-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
            args.extend(rule.split(' '));
            netns.exec("iptables", &args)?;
        }
        Ok(netns)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn exec(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend(args);
        run("ip", &full)
    }
}

const RULES: [&str; 5] = [
    "-d 127.0.0.3 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001",
    "-d 127.0.0.4 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001",
    "-d 127.0.0.4 ! -s 127.0.0.6 -m owner --uid-owner 1337 -j REDIRECT --to-ports 15006",
    "-d 127.0.0.5 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001",
    "-d 127.0.0.5 ! -s 127.0.0.6 -m owner --uid-owner 1337 -j REDIRECT --to-ports 15006",
];

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Deletes namespaces left by runs that were killed before their guard ran.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        // trellis-bench-<pid> or trellis-bench-<kind>-<pid>
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.rsplit('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: removing stale namespace {name}");
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
