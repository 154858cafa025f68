//! The real binary in `--config` mode: readiness, admin endpoints, metrics endpoint, drain and
//! exit codes, refusing unredirected connections.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::{BIN, Ports, Proxy, http, sample, temp_path};

const CONFIG: &str = r#"{
  "version": "static-42",
  "outboundTrafficPolicy": "REGISTRY_ONLY",
  "services": [{
    "hostnames": ["reviews.demo.svc.cluster.local"],
    "namespace": "demo",
    "vips": ["10.96.0.20"],
    "ports": [{"name": "http", "port": 9080, "targetPort": 8080, "protocol": "http"}],
    "endpoints": [{"address": "10.244.0.7", "ready": true, "meshed": true}]
  }]
}"#;

#[test]
fn serves_readiness_config_dump_and_metrics() {
    let mut proxy = Proxy::with_config(Ports::free(), CONFIG, &[]);
    proxy.wait_ready();

    assert_eq!(http("GET", proxy.ports.readiness, "/healthz/ready").0, 200);
    assert_eq!(proxy.admin("GET", "/ready").0, 200);

    let (status, body) = proxy.admin("GET", "/config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["config"]["version"], "static-42");
    assert_eq!(dump["config"]["outboundTrafficPolicy"], "REGISTRY_ONLY");
    assert_eq!(
        dump["config"]["services"][0]["hostnames"][0],
        "reviews.demo.svc.cluster.local"
    );
    assert_eq!(
        dump["workload"]["spiffeId"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(dump["workload"]["podName"], "client-7d9f-abcde");
    assert!(
        dump["certificate"].is_null(),
        "static mode holds no certificate"
    );

    // No traffic yet: no Istio sample, only the listeners' connection counts, well-formed
    // OpenMetrics.
    let metrics = proxy.scrape();
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    assert!(!metrics.contains("istio_"), "{metrics}");
    for listener in ["outbound", "inbound"] {
        let label = format!("listener=\"{listener}\"");
        assert_eq!(
            sample(&metrics, "trellis_listener_connections", &[&label]),
            Some(0),
            "{metrics}"
        );
    }
    assert_eq!(http("GET", proxy.ports.metrics, "/nope").0, 404);
    assert_eq!(proxy.admin("GET", "/quitquitquit").0, 405);
}

#[test]
fn log_level_changes_at_runtime() {
    let mut proxy = Proxy::with_config(Ports::free(), CONFIG, &[]);
    proxy.wait_ready();
    let (status, body) = proxy.admin("GET", "/logging");
    assert_eq!((status, body.trim()), (200, "info"));
    let (status, body) = proxy.admin("POST", "/logging?level=debug");
    assert_eq!((status, body.trim()), (200, "debug"));
    let (status, _) = proxy.admin("POST", "/logging?level=no%20such%20level[");
    assert_eq!(status, 400);
    assert_eq!(proxy.admin("GET", "/logging").1.trim(), "debug");
}

#[test]
fn direct_dials_of_the_capture_listeners_are_refused_not_looped() {
    let mut proxy = Proxy::with_config(Ports::free(), CONFIG, &[]);
    proxy.wait_ready();
    for port in [proxy.ports.outbound, proxy.ports.inbound] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        // Closed by the proxy at once: EOF (or a reset), not a hang and not a loop.
        let read = stream.read(&mut buf);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "proxy must keep running"
    );
    assert!(proxy.logs().contains("not redirected"), "{}", proxy.logs());
}

#[test]
fn quitquitquit_drains_and_exits_zero() {
    let mut proxy = Proxy::with_config(Ports::free(), CONFIG, &["--drain-seconds", "3"]);
    proxy.wait_ready();
    let (status, _) = proxy.admin("POST", "/quitquitquit");
    assert_eq!(status, 200);
    let exit = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
    assert!(proxy.logs().contains("draining"));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut proxy = Proxy::with_config(Ports::free(), CONFIG, &[]);
    proxy.wait_ready();
    let killed = Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
    assert!(proxy.logs().contains("SIGTERM"));
}

#[test]
fn malformed_config_fails_with_a_clear_error() {
    let path = temp_path("broken.json");
    std::fs::write(&path, r#"{"version": "1", "services": "not a list"}"#).unwrap();
    let output = Command::new(BIN)
        .args(["sidecar", "--config", path.to_str().unwrap()])
        .args([
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
        ])
        .args(["--metrics-port", "0", "--readiness-port", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
    assert!(
        stderr.contains("expected a sequence at line 1"),
        "names the problem: {stderr}"
    );

    let missing = temp_path("missing.json");
    let output = Command::new(BIN)
        .args(["sidecar", "--config", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}
