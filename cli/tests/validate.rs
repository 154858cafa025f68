//! `trellisctl validate` as a user runs it: the real binary on files, a directory and standard
//! input, judged by its output and exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn trellisctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellisctl-{}-{name}", std::process::id()));
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    dir
}

const VALID: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n";
const TYPO: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConections: 1}}}\n";

#[test]
fn a_directory_with_a_misspelt_field_fails_naming_it() {
    let dir = temp_dir("dir");
    std::fs::write(dir.join("good.yaml"), VALID).unwrap();
    std::fs::write(dir.join("nested/bad.yml"), TYPO).unwrap();
    std::fs::write(dir.join("notes.txt"), "not read").unwrap();
    let out = trellisctl(&["validate", "-f", dir.to_str().unwrap()], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "bad.yml#1: DestinationRule shop/reviews: \
             spec.trafficPolicy.connectionPool.tcp.maxConections: unknown field"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("1 valid, 1 invalid, 0 skipped"), "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn valid_input_on_stdin_passes_and_unreadable_input_is_status_2() {
    let out = trellisctl(&["validate", "-f", "-", "-n", "shop"], Some(VALID));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 valid, 0 invalid"));

    let out = trellisctl(&["validate", "-f", "/nonexistent/file.yaml"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading /nonexistent/file.yaml"));

    let out = trellisctl(&["validate", "-f", "-"], Some("a: [unclosed\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<stdin>#1: not YAML"));
}
