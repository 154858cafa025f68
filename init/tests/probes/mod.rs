//! What the init and cni netns tests share (cni includes this file by path): running a command
//! and checking it succeeded, a listener process that answers each connection with its tag and
//! original destination, and the client script that prints that answer.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

/// Runs `command`, fails the test with its stderr unless it succeeds, returns its stdout.
pub fn run(command: &mut Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
    assert!(
        status.success(),
        "{command:?} failed ({status}): {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).expect("UTF-8 output")
}

/// Accepts on every `port=tag` argument and answers each connection with one line: the tag and
/// the connection's original destination. Prints `ready` once listening.
pub const LISTENER_PY: &str = include_str!("listener.py");

/// Connects to argv[1]:argv[2] and prints the listener's answer, or why there was none.
pub const CLIENT_PY: &str = include_str!("client.py");

/// A listener process, killed on drop.
pub struct Listener(Child);

impl Listener {
    /// Runs the listener script with `command` (a python3 launched where it must listen).
    pub fn start(mut command: Command, ports: &[(u16, &str)]) -> Self {
        command
            .args(["-c", LISTENER_PY])
            .args(ports.iter().map(|(port, tag)| format!("{port}={tag}")))
            .stdout(Stdio::piped());
        let mut listener = Self(command.spawn().expect("spawning listener"));
        let mut ready = String::new();
        BufReader::new(listener.0.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut ready)
            .expect("reading listener readiness");
        assert_eq!(ready.trim(), "ready", "listener {ports:?} did not start");
        listener
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
