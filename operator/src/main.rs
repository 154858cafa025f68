//! `trellis-operator` binary: `run` (the operator) and `manifests` (prints manifests/operator.yaml),
//! built on the `trellis_operator` library.

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use clap::{Parser, Subcommand};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::Client;
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use trellis_config::wellknown::{
    CONTROL_PLANE_PORT, OPERATOR_NAME, OPERATOR_NAMESPACE, WEBHOOK_PORT,
};

use trellis_operator::context::{Context, MeshStateRx};
use trellis_operator::metrics::Metrics;
use trellis_operator::rate_limit::RateLimiter;
use trellis_operator::{
    cni, control_plane, controller, discovery, https, leader, manifests, proxies, validation,
    webhook,
};

#[derive(Parser)]
#[command(name = "trellis-operator", version = trellis_config::version::current(), about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator (in the cluster, or against $KUBECONFIG).
    Run {
        /// Namespace the operator runs in (its CA Secret and Lease live there).
        #[arg(long, env = "POD_NAMESPACE", default_value = OPERATOR_NAMESPACE)]
        namespace: String,
        /// This replica's name, for leader election and events.
        #[arg(long, env = "POD_NAME", default_value = "trellis-operator-local")]
        pod_name: String,
    },
    /// Print the install manifest (manifests/operator.yaml).
    Manifests {
        /// Registry and path the operator image is pulled from; also the default of every
        /// Mesh's `spec.proxy.imageRegistry` (the data-plane images).
        #[arg(long, default_value = trellis_config::wellknown::DEFAULT_IMAGE_REGISTRY)]
        image_registry: String,
    },
}

/// Lifetime of the operator's own serving certificates; re-issued at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Manifests { image_registry } => {
            anyhow::ensure!(
                manifests::valid_image_registry(&image_registry),
                "--image-registry {image_registry:?} is not an image repository prefix \
                 (host[:port][/path], e.g. registry.example.com/trellis)"
            );
            print!("{}", manifests::render(&image_registry));
            Ok(())
        }
        Command::Run {
            namespace,
            pod_name,
        } => {
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .init();
            rustls::crypto::ring::default_provider()
                .install_default()
                .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(namespace, pod_name))
        }
    }
}

async fn run(namespace: String, pod_name: String) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let version = client
        .apiserver_version()
        .await
        .context("reading the API server version")?;
    let native_sidecars = supports_native_sidecars(&version.major, &version.minor);
    info!(server = %version.git_version, native_sidecars, "connected to Kubernetes");

    let metrics = Arc::new(Metrics::default());
    let proxies = Arc::new(proxies::ConnectedProxies::default());
    let (ctx, mesh_rx) = Context::new(
        client.clone(),
        namespace.clone(),
        pod_name.clone(),
        metrics.clone(),
        proxies.clone(),
    );

    let health = TcpListener::bind((Ipv4Addr::UNSPECIFIED, manifests::HEALTH_PORT)).await?;
    tokio::spawn(serve_health(health, metrics.clone()));

    let discovery = discovery::Discovery::start(client.clone()).await;
    discovery.ready().await;
    info!("discovery synced");
    let snapshots = control_plane::publish_snapshots(discovery.clone(), mesh_rx.clone());
    let control_plane_tls = Arc::new(ArcSwapOption::empty());
    let webhook_tls = Arc::new(ArcSwapOption::empty());
    tokio::spawn(keep_serving_certificates(
        mesh_rx.clone(),
        namespace.clone(),
        control_plane_tls.clone(),
        webhook_tls.clone(),
    ));

    let control_plane = Arc::new(control_plane::ControlPlane {
        client: client.clone(),
        mesh: mesh_rx.clone(),
        discovery: discovery.clone(),
        snapshots,
        proxies,
        proxy_certificates: ctx.proxy_certificates.clone(),
        metrics: metrics.clone(),
        signing_permits: tokio::sync::Semaphore::new(control_plane::MAX_CONCURRENT_SIGNINGS),
        certificate_rate: RateLimiter::new(
            control_plane::CERTIFICATE_RATE,
            control_plane::CERTIFICATE_RATE_PER_SOURCE,
        ),
        pod_read_rate: RateLimiter::new(
            control_plane::POD_READ_RATE,
            control_plane::POD_READ_RATE_PER_SOURCE,
        ),
    });
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, CONTROL_PLANE_PORT)).await?;
    tokio::spawn(https::serve(
        listener,
        control_plane_tls,
        https::Limits::control_plane(),
        move |req, peer| control_plane.clone().handle(req, peer),
    ));

    let webhook = Arc::new(webhook::Webhook {
        client: client.clone(),
        mesh: mesh_rx.clone(),
        operator_namespace: namespace.clone(),
        native_sidecars,
        metrics: metrics.clone(),
    });
    let validation = Arc::new(validation::Validation {
        client: client.clone(),
    });
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, WEBHOOK_PORT)).await?;
    tokio::spawn(https::serve(
        listener,
        webhook_tls,
        https::Limits::webhook(),
        move |req, peer| {
            // One port, two admission webhooks: the injector and the traffic-rule validation.
            let (webhook, validation) = (webhook.clone(), validation.clone());
            async move {
                if req.uri().path() == validation::VALIDATE_PATH {
                    validation.handle(req, peer).await
                } else {
                    webhook.handle(req, peer).await
                }
            }
        },
    ));

    metrics.set_ready();

    let elector = leader::LeaderElector::new(client.clone(), &namespace, pod_name);
    // Serve (certificates, injection, config) from what the leader reconciled until this
    // replica leads.
    tokio::select! {
        () = controller::follow(ctx.clone()) => {}
        () = elector.acquire() => {}
    }
    tokio::select! {
        result = controller::run(ctx.clone()) => {
            result?;
            info!("controller stopped");
        }
        () = cni::repair_loop(ctx) => info!("repair loop stopped"),
        () = elector.hold() => {
            // Another replica may take over now; stop at once rather than act as a second leader.
            error!("lost the leader lease; exiting");
            std::process::exit(1);
        }
    }
    Ok(())
}

/// Native sidecars (restartable init containers) are on by default from Kubernetes 1.29.
fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    (number(major), number(minor)) >= (1, 29)
}

/// Issues the serving certificates from the mesh CA whenever it changes, and at half-life.
async fn keep_serving_certificates(
    mut mesh: MeshStateRx,
    namespace: String,
    control_plane: Arc<ArcSwapOption<rustls::ServerConfig>>,
    webhook: Arc<ArcSwapOption<rustls::ServerConfig>>,
) {
    let names: Vec<String> = [
        format!("{OPERATOR_NAME}.{namespace}.svc"),
        trellis_api::istio::host::service_fqdn(OPERATOR_NAME, &namespace),
        format!("{OPERATOR_NAME}.{namespace}"),
        OPERATOR_NAME.to_owned(),
    ]
    .into();
    loop {
        let state = mesh.borrow_and_update().clone();
        if let Some(state) = state {
            let issued = state
                .ca
                .issue_serving(&names, SERVING_CERT_TTL)
                .map_err(anyhow::Error::from)
                .and_then(|(chain, key)| {
                    let roots = state.ca.trust_bundle();
                    Ok((
                        https::server_config(&chain, &key, Some(&roots))?,
                        https::server_config(&chain, &key, None)?,
                    ))
                });
            match issued {
                Ok((cp, wh)) => {
                    control_plane.store(Some(Arc::new(cp)));
                    webhook.store(Some(Arc::new(wh)));
                    info!("serving certificates issued");
                }
                Err(e) => warn!(error = %e, "could not issue serving certificates"),
            }
        }
        tokio::select! {
            changed = mesh.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(SERVING_CERT_TTL / 2) => {}
        }
    }
}

/// `/healthz` (alive), `/readyz` (discovery synced) and `/metrics` on plain HTTP.
async fn serve_health(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match request.uri().path() {
                        "/healthz" => (StatusCode::OK, "ok".to_owned()),
                        "/readyz" if metrics.is_ready() => (StatusCode::OK, "ready".to_owned()),
                        "/readyz" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "discovery not synced".to_owned(),
                        ),
                        "/metrics" => (StatusCode::OK, metrics.encode()),
                        _ => (StatusCode::NOT_FOUND, "not found".to_owned()),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            .expect("valid response"),
                    )
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
