//! The cluster itself: pods scheduled from our images talk to each other through a Service,
//! found by name through the test cluster's DNS.

use std::time::Duration;

use trellis_e2e::*;

#[tokio::test]
async fn pods_reach_each_other_through_a_service_by_name() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create("e2e-plain", &[])?;
    apply(&echo_server_yaml(&ns.name, "echo", "v1", 2))?;
    wait_pods_ready(&client, &ns.name, "app=echo", 2, Duration::from_secs(120)).await?;
    let url = format!("http://echo.{}.svc.cluster.local/", ns.name);
    let summary = run_client(
        &client,
        &ns.name,
        "client",
        &["--url", &url, "--rate", "20", "--count", "100"],
        Duration::from_secs(120),
    )
    .await?;
    assert_eq!(summary.sent, 100, "{summary:?}");
    assert_eq!(summary.ok, 100, "every request answered 2xx: {summary:?}");
    assert_eq!(summary.by_version.get("v1"), Some(&100), "{summary:?}");
    let echo_pods = summary
        .by_name
        .keys()
        .filter(|n| n.starts_with("echo-v1-"))
        .count();
    assert!(
        echo_pods >= 1,
        "answers came from the Service's pods: {summary:?}"
    );
    Ok(())
}
