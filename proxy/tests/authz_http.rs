//! AuthorizationPolicy on HTTP with the real proxy binary: a server sidecar (static config, pod
//! address 127.0.0.20, port declared `http`, PERMISSIVE) in front of a small HTTP application
//! on the pod address that answers with the request target it received. Plaintext clients connect
//! from 127.0.0.7 over real sockets; a REDIRECT rule sends them to the inbound listener.
//!
//! It proves the seed example (ALLOW GET: GET 200, POST 403 `RBAC: access denied`) and that the
//! path is normalised once, the same for the decision and for what the application receives.
//!
//! Needs root, iproute2 and iptables.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};

use support::{Netns, Ports, Proxy, connect_from, sample};

const INSIDE: &str = "TRELLIS_PROXY_AUTHZ_HTTP_TEST_IN_NETNS";
const PEER: &str = "127.0.0.7";
const POD_B: &str = "127.0.0.20";
/// The application's port, declared `http` (served by the proxy's HTTP path).
const HTTP_PORT: u16 = 7300;

#[test]
fn http_requests_are_authorized_on_their_normalised_path() {
    if std::env::var_os(INSIDE).is_some() {
        inside_netns();
        return;
    }
    let netns = Netns::create("authz-http")
        .expect("cannot create a network namespace: this test needs root, iproute2 and iptables");
    assert!(netns.exec("ip", &["link", "set", "lo", "up"]).success());
    netns.nat_output(&["-s", "127.0.0.6", "-j", "RETURN"]);
    netns.nat_output(&["-d", POD_B, "-j", "REDIRECT", "--to-ports", "15006"]);
    netns.rerun_inside(INSIDE);
}

/// An HTTP/1.1 application on every address, port `port`, answering every request `200` with the
/// request target it received as the body (keep-alive, as the proxy pools connections).
fn target_echo_app(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut content_length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            content_length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; content_length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let target = request_line.split(' ').nth(1).unwrap_or("").to_owned();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{target}",
                        target.len()
                    );
                    if writer.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// One HTTP/1.1 request from [`PEER`] to the pod; returns status, headers (lowercase names) and
/// body.
fn request(method: &str, target: &str) -> (u16, Vec<(String, String)>, String) {
    let dst: SocketAddr = format!("{POD_B}:{HTTP_PORT}").parse().unwrap();
    let mut stream = connect_from(PEER, dst);
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: web.shop.svc.cluster.local\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn inside_netns() {
    target_echo_app(HTTP_PORT);
    let authorization = r#"{
        "deny": [{"name": "shop.deny-admin", "rules": [
            {"to": [{"paths": [{"prefix": "/admin"}]}]}]}],
        "allow": [{"name": "shop.allow-get", "rules": [
            {"to": [{"methods": [{"exact": "GET"}]}]}]}]
    }"#;
    let config = format!(
        r#"{{"version":"b-1","services":[{{
              "hostnames":["web.shop.svc.cluster.local"],"namespace":"shop","vips":["10.96.0.1"],
              "ports":[{{"name":"http","port":80,"targetPort":{HTTP_PORT},"protocol":"http"}}],
              "endpoints":[{{"address":"{POD_B}","ready":true,"meshed":true}}]}}],
            "inbound":{{"mtlsMode":"PERMISSIVE","authorization":{authorization}}}}}"#
    );
    let mut ports = Ports::free();
    ports.inbound = 15006;
    let mut b = Proxy::with_config_and_env(
        ports,
        &config,
        &[],
        &[
            ("POD_NAME", "web-0"),
            ("POD_NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "web"),
            ("WORKLOAD_NAME", "web"),
        ],
    );
    b.wait_ready();

    // The seed example: ALLOW GET.
    let (status, _, body) = request("GET", "/items");
    assert_eq!((status, body.as_str()), (200, "/items"), "{}", b.logs());
    let (status, headers, body) = request("POST", "/items");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body.trim_end(), "RBAC: access denied");
    assert_eq!(
        header(&headers, "x-trellis-reason"),
        Some("rbac_access_denied")
    );

    // What the application receives is the normalised path, the one that was authorized.
    let table = [
        ("/a/./b/../c//d?x=%2F", 200, "/a/c/d?x=%2F"),
        ("/%61pi", 200, "/api"),
        // Each of these is /admin once normalised: denied by the DENY, never forwarded.
        ("/admin", 403, "RBAC: access denied"),
        ("/public/../admin", 403, "RBAC: access denied"),
        ("/public/%2e%2e/admin/users", 403, "RBAC: access denied"),
        ("//admin", 403, "RBAC: access denied"),
        ("/%61dmin", 403, "RBAC: access denied"),
        // Case-sensitive like Istio: /ADMIN is another path (see `proxy/src/path.rs`).
        ("/ADMIN", 200, "/ADMIN"),
    ];
    for (target, status, body) in table {
        let (got_status, _, got_body) = request("GET", target);
        assert_eq!(
            (got_status, got_body.trim_end()),
            (status, body),
            "GET {target}\n{}",
            b.logs()
        );
    }
    // Escaped slashes and backslashes are refused before any policy or application sees them.
    for target in ["/admin%2Fusers", "/public%5c..%5cadmin", "/a\\b"] {
        let (status, headers, _) = request("GET", target);
        assert_eq!(status, 400, "GET {target}");
        assert_eq!(
            header(&headers, "x-trellis-reason"),
            Some("invalid_path"),
            "GET {target}"
        );
    }

    let metrics = b.scrape();
    assert_eq!(
        sample(
            &metrics,
            "trellis_authorization_denied_total",
            &["policy=\"shop.deny-admin\""]
        ),
        Some(5),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "trellis_authorization_denied_total",
            &["policy=\"none\""]
        ),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "istio_requests_total",
            &["response_code=\"403\"", "response_flags=\"RBAC\""]
        ),
        Some(6),
        "{metrics}"
    );
}
