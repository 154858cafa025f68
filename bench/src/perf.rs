//! CPU profiles with `perf record -e cpu-clock` (a software event: this VM exposes no hardware
//! counters) and DWARF call graphs, attached to a running process; and the attribution of
//! its samples to named categories (TLS, HTTP/2 framing, JSON encoding, …), kernel time
//! included.
//!
//! A sample whose leaf is user code belongs to the category of its innermost frame that matches
//! one: a `memcpy` under `serde_json::ser` is JSON encoding. A sample whose leaf is kernel code
//! belongs to a kernel category ([`KERNEL_CATEGORIES`]: scheduling and wakeups, the network
//! stack, the rest), decided the same way over its kernel frames: on this 2-core VM the kernel
//! is half of a proxy's time, and which part of the kernel matters for the follow-up.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::procs::{Proc, run};

/// Samples per second and thread; enough for a few thousand samples per profiled second of
/// two busy threads, small enough that `perf script` stays within a minute.
const FREQUENCY: &str = "999";
/// Bytes of user stack copied per sample for DWARF unwinding: deep enough for the innermost
/// ~40 frames of a tokio task, which is where the categories are decided.
const STACK_DUMP: &str = "dwarf,16384";
/// The category of a sample no pattern matches.
pub const OTHER: &str = "other";
/// The category of a kernel sample no kernel pattern matches.
pub const KERNEL_OTHER: &str = "kernel: other (syscall entry and exit, page faults, timers)";

/// Kernel code by what it does for the process.
pub const KERNEL_CATEGORIES: &[Category] = &[
    // Before the network stack: a wakeup from `sock_def_readable` is the cost of waking the
    // reader, not of moving bytes.
    Category {
        name: "kernel: scheduling and wakeups (context switches, futex, epoll)",
        patterns: &[
            "schedule",
            "finish_task_switch",
            "try_to_wake_up",
            "wake_up",
            "futex",
            "epoll",
        ],
    },
    Category {
        name: "kernel: network stack and socket copies",
        patterns: &[
            "tcp_",
            "sock_",
            "skb",
            "ip_",
            "inet",
            "netif",
            "nf_",
            "_copy_to_iter",
            "_copy_from_iter",
            "softirq",
            "napi",
            "sendmsg",
            "recvmsg",
        ],
    },
];

/// A named category and the symbol substrings that put a frame in it.
#[derive(Debug, Clone, Copy)]
pub struct Category {
    pub name: &'static str,
    pub patterns: &'static [&'static str],
}

/// A `perf record` attached to a running process; stop it with [`Recording::stop`].
pub struct Recording {
    perf: Proc,
    data: PathBuf,
}

impl Recording {
    /// Attaches `perf record` to `pid` (all its threads), writing `data`.
    pub fn attach(pid: u32, data: &Path) -> Result<Self> {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-e", "cpu-clock", "-F", FREQUENCY, "--call-graph"])
            .arg(STACK_DUMP)
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(data);
        let log = data.with_extension("log");
        let mut perf = Proc::spawn("perf record", &mut cmd, &log)?;
        // perf has no readiness signal; its events are open well within this.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = perf.try_exit()? {
            bail!(
                "perf record -p {pid} exited at once ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(Self {
            perf,
            data: data.to_owned(),
        })
    }

    /// Stops the recording (SIGINT, as Ctrl-C would) and returns the data file.
    pub fn stop(mut self) -> Result<PathBuf> {
        run("kill", &["-INT", &self.perf.pid().to_string()])?;
        let status = self.perf.wait_exit(Duration::from_secs(120))?;
        // perf exits with the signal's status after writing its data.
        if !self.data.exists() {
            bail!(
                "perf record ended ({status}) without writing {}",
                self.data.display()
            );
        }
        Ok(self.data)
    }
}

/// One stack frame of a sample: the symbol (offset stripped) and whether it is kernel code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub symbol: String,
    pub kernel: bool,
}

/// The samples of `data`, each a stack from the leaf outwards, streamed from `perf script`.
pub fn samples(data: &Path) -> Result<Vec<Vec<Frame>>> {
    let mut child = Command::new("perf")
        .args(["script", "-F", "comm,tid,ip,sym,dso", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("perf script")?;
    let stdout = child.stdout.take().context("perf script without stdout")?;
    let samples = parse_script(BufReader::new(stdout))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("perf script -i {} failed ({status})", data.display());
    }
    Ok(samples)
}

/// Parses `perf script` output: a header line per sample, then one indented line per frame
/// (`addr symbol+0xoff (dso)`), samples separated by blank lines.
pub fn parse_script(reader: impl BufRead) -> Result<Vec<Vec<Frame>>> {
    let mut samples = Vec::new();
    let mut current: Option<Vec<Frame>> = None;
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            samples.extend(current.take());
        } else if line.starts_with(char::is_whitespace) {
            if let Some(stack) = current.as_mut() {
                stack.push(parse_frame(line.trim()));
            }
        } else {
            samples.extend(current.replace(Vec::new()));
        }
    }
    samples.extend(current);
    Ok(samples)
}

fn parse_frame(line: &str) -> Frame {
    // "ffffffff82010b93 tcp_recvmsg+0x53 ([kernel.kallsyms])"
    let (rest, dso) = match line.rfind(" (") {
        Some(i) => (&line[..i], line[i + 2..].trim_end_matches(')')),
        None => (line, ""),
    };
    let symbol = rest.split_once(' ').map_or("", |(_, s)| s);
    let symbol = match symbol.rfind("+0x") {
        Some(i) => &symbol[..i],
        None => symbol,
    };
    Frame {
        symbol: symbol.to_owned(),
        kernel: dso.starts_with("[kernel"),
    }
}

/// The category of one sample: for a user-code leaf, that of its innermost frame matching one
/// of `categories`; for a kernel leaf, that of its innermost kernel frame matching one of
/// [`KERNEL_CATEGORIES`].
pub fn classify<'c>(stack: &[Frame], categories: &'c [Category]) -> &'c str {
    fn innermost<'a, 'c>(
        mut frames: impl Iterator<Item = &'a Frame>,
        categories: &'c [Category],
    ) -> Option<&'c str> {
        frames.find_map(|frame| {
            categories
                .iter()
                .find(|c| c.patterns.iter().any(|p| frame.symbol.contains(p)))
                .map(|c| c.name)
        })
    }
    if stack.first().is_some_and(|f| f.kernel) {
        innermost(stack.iter().take_while(|f| f.kernel), KERNEL_CATEGORIES).unwrap_or(KERNEL_OTHER)
    } else {
        innermost(stack.iter(), categories).unwrap_or(OTHER)
    }
}

/// Every category's samples: `categories` in their order, then [`OTHER`], then the kernel's.
pub fn attribute(samples: &[Vec<Frame>], categories: &[Category]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for stack in samples {
        *counts.entry(classify(stack, categories)).or_default() += 1;
    }
    categories
        .iter()
        .map(|c| c.name)
        .chain([OTHER])
        .chain(KERNEL_CATEGORIES.iter().map(|c| c.name))
        .chain([KERNEL_OTHER])
        .map(|name| {
            (
                name.to_owned(),
                counts.get(name).copied().unwrap_or_default(),
            )
        })
        .collect()
}

/// The leaf symbols holding the most samples, with their counts.
pub fn top_leaves(samples: &[Vec<Frame>], n: usize) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for stack in samples {
        let leaf = stack.first().map_or("[no frame]", |f| f.symbol.as_str());
        *counts.entry(leaf).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> =
        counts.into_iter().map(|(s, c)| (s.to_owned(), c)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(n);
    top
}

/// A profile's attribution as JSON: the categories with their sample counts and the top leaves.
pub fn summary(samples: &[Vec<Frame>], categories: &[Category]) -> Value {
    let shares = attribute(samples, categories);
    json!({
        "samples": samples.len(),
        "kernel_samples": samples.iter().filter(|s| s.first().is_some_and(|f| f.kernel)).count(),
        "categories": shares.iter().map(|(name, n)| json!({"name": name, "samples": n}))
            .collect::<Vec<_>>(),
        "top_leaves": top_leaves(samples, 25).iter().map(|(sym, n)| json!({
            "symbol": sym, "samples": n,
        })).collect::<Vec<_>>(),
    })
}

/// The text file of a profile: categories, then the top leaf symbols.
pub fn text(title: &str, summary: &Value) -> String {
    let total = summary["samples"].as_u64().unwrap_or(0).max(1) as f64;
    let mut out = format!(
        "{title}\nperf record -e cpu-clock -F {FREQUENCY} --call-graph {STACK_DUMP}; {} samples, \
         {} with a kernel leaf\n\nsamples   share  category (innermost matching frame)\n",
        summary["samples"], summary["kernel_samples"]
    );
    // One line per entry of `summary[list]`: its samples, their share and its `label`.
    let rows = |out: &mut String, list: &str, label: &str| {
        for entry in summary[list].as_array().into_iter().flatten() {
            let n = entry["samples"].as_u64().unwrap_or(0);
            let _ = writeln!(
                out,
                "{n:>7} {:>6.1}%  {}",
                n as f64 * 100.0 / total,
                entry[label].as_str().unwrap_or("?")
            );
        }
    };
    rows(&mut out, "categories", "name");
    out.push_str("\nsamples   share  leaf symbol (exclusive)\n");
    rows(&mut out, "top_leaves", "symbol");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATEGORIES: &[Category] = &[
        Category {
            name: "TLS",
            patterns: &["rustls::", "ring_core_"],
        },
        Category {
            name: "JSON encoding",
            patterns: &["serde_json::ser"],
        },
    ];

    fn frame(symbol: &str, kernel: bool) -> Frame {
        Frame {
            symbol: symbol.to_owned(),
            kernel,
        }
    }

    #[test]
    fn perf_script_output_is_split_into_stacks_leaf_first() {
        let script = "\
tokio-rt-worker 21823 21068.471412:    2004008 cpu-clock: 
\tffffffff82010b93 tcp_recvmsg+0x53 ([kernel.kallsyms])
\t          10a974 __libc_recv+0x64 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          5d545f tokio::net::tcp::stream::TcpStream::poll_read_priv+0xbf (/x/trellis-proxy)

tokio-rt-worker 21824 21068.472050:    2004008 cpu-clock: 
\t          73bde2 [unknown] (/x/trellis-proxy)
";
        let samples = parse_script(script.as_bytes()).unwrap();
        assert_eq!(
            samples,
            vec![
                vec![
                    frame("tcp_recvmsg", true),
                    frame("__libc_recv", false),
                    frame("tokio::net::tcp::stream::TcpStream::poll_read_priv", false),
                ],
                vec![frame("[unknown]", false)],
            ]
        );
    }

    #[test]
    fn a_sample_belongs_to_its_innermost_categorised_frame() {
        let table: &[(&[(&str, bool)], &str)] = &[
            // memcpy under the serializer is JSON encoding, even below a TLS frame.
            (
                &[
                    ("__memmove_avx_unaligned_erms", false),
                    ("serde_json::ser::format_escaped_str", false),
                    ("rustls::conn::Whatever", false),
                ],
                "JSON encoding",
            ),
            // A kernel leaf takes a kernel category, whatever user code called it; a wakeup
            // inside the network stack counts as a wakeup.
            (
                &[
                    ("tcp_sendmsg", true),
                    ("__libc_write", false),
                    ("<rustls::conn::ConnectionCommon<T>>::write_tls", false),
                ],
                "kernel: network stack and socket copies",
            ),
            (
                &[
                    ("_raw_spin_unlock_irqrestore", true),
                    ("try_to_wake_up", true),
                    ("sock_def_readable", true),
                    ("tcp_rcv_established", true),
                ],
                "kernel: scheduling and wakeups (context switches, futex, epoll)",
            ),
            (
                &[("do_syscall_64", true), ("rustls::x", false)],
                KERNEL_OTHER,
            ),
            (
                &[("ring_core_0_17_14__aes_hw_ctr32_encrypt_blocks", false)],
                "TLS",
            ),
            (&[("tokio::runtime::park", false)], OTHER),
            (&[], OTHER),
        ];
        for (stack, want) in table {
            let stack: Vec<Frame> = stack.iter().map(|&(s, k)| frame(s, k)).collect();
            assert_eq!(classify(&stack, CATEGORIES), *want, "{stack:?}");
        }
    }

    #[test]
    fn attribution_counts_every_sample_once_in_user_or_kernel_categories() {
        let samples = vec![
            vec![frame("tcp_sendmsg", true), frame("rustls::x", false)],
            vec![frame("ring_core_gcm", false)],
            vec![frame("rustls::y", false)],
            vec![frame("serde_json::ser::f", false)],
            vec![frame("schedule", true)],
        ];
        let got = attribute(&samples, CATEGORIES);
        let want = [
            ("TLS", 2),
            ("JSON encoding", 1),
            (OTHER, 0),
            (KERNEL_CATEGORIES[0].name, 1),
            (KERNEL_CATEGORIES[1].name, 1),
            (KERNEL_OTHER, 0),
        ];
        assert_eq!(got.len(), want.len());
        for ((name, n), (want_name, want_n)) in got.iter().zip(want) {
            assert_eq!((name.as_str(), *n), (want_name, want_n));
        }
        assert_eq!(
            top_leaves(&samples, 2),
            vec![("ring_core_gcm".to_owned(), 1), ("rustls::y".to_owned(), 1)]
        );
    }
}
