//! `trellis-proxy sidecar`: wires the config source, the identity, the listeners and the HTTP
//! endpoints together, and drains on SIGTERM, `/quitquitquit` or the control plane's `exit`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::app_probe::{APP_HEALTH_PREFIX, APP_PROBERS_ENV, AppProbers};
use crate::cli::SidecarArgs;
use crate::control_plane::{ControlPlane, certificate, config_stream};
use crate::http_server::{self, respond, text};
use crate::identity::Identity;
use crate::inbound::Inbound;
use crate::logging::LogControl;
use crate::outbound::Outbound;
use crate::state::ProxyState;
use crate::{admin, config_file, readiness};

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub async fn run(args: SidecarArgs, log: LogControl) -> anyhow::Result<()> {
    let control_plane = match (&args.config, &args.control_plane) {
        (Some(_), _) => None,
        (None, Some(url)) => Some(Arc::new(ControlPlane::from_args(url, &args)?)),
        (None, None) => anyhow::bail!("either --config or --control-plane is required"),
    };
    let state = Arc::new(ProxyState::new(&args, control_plane.is_some(), log));
    if let Some(path) = &args.config {
        let config = config_file::load(path)?;
        info!(file = %path.display(), version = config.version, "static config loaded");
        state.set_config(Arc::new(config));
    }
    if let (Some(chain), Some(key)) = (&args.cert_chain, &args.key) {
        let identity = Identity::from_pem_files(chain, key)?;
        info!(spiffe_id = %identity.spiffe_id, "static workload certificate loaded");
        state.identity.send_replace(Some(Arc::new(identity)));
    }

    let outbound = Outbound::new(SocketAddr::new(ANY, args.outbound_port), state.clone())
        .await
        .with_context(|| {
            format!(
                "binding the outbound listener on port {}",
                args.outbound_port
            )
        })?;
    let inbound = Inbound::new(SocketAddr::new(ANY, args.inbound_port), state.clone())
        .await
        .with_context(|| format!("binding the inbound listener on port {}", args.inbound_port))?;
    let admin = bind(LOCALHOST, args.admin_port, "admin").await?;
    let metrics = bind_both_families(args.metrics_port, "metrics")?;
    let readiness = bind_both_families(args.readiness_port, "readiness")?;
    state.listeners_bound.store(true, Ordering::Release);
    info!(
        outbound = %outbound.local_addr()?,
        inbound = %inbound.local_addr()?,
        admin = args.admin_port,
        metrics = args.metrics_port,
        readiness = args.readiness_port,
        mode = if control_plane.is_some() { "control-plane" } else { "static" },
        "listening"
    );

    let app_probers = AppProbers::from_json(std::env::var(APP_PROBERS_ENV).ok().as_deref())
        .with_context(|| format!("{APP_PROBERS_ENV} is not valid JSON"))?;
    spawn_endpoints(&state, admin, metrics, readiness, app_probers);
    if let Some(control_plane) = control_plane {
        tokio::spawn(certificate::run(
            control_plane.clone(),
            state.clone(),
            args.rotation_percent,
        ));
        tokio::spawn(config_stream::run(control_plane, state.clone()));
    }
    tokio::spawn(drain_on_signals(state.clone()));

    tokio::join!(outbound.run(), inbound.run());
    let left = state
        .drain
        .wait_connections(Duration::from_secs(args.drain_seconds))
        .await;
    info!(connections_cut = left, "drained, exiting");
    Ok(())
}

async fn bind(ip: IpAddr, port: u16, name: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind((ip, port))
        .await
        .with_context(|| format!("binding the {name} endpoint on {ip}:{port}"))
}

/// Binds `port` on every IPv4 and IPv6 address (a pod's probes and scrapes come to whichever
/// address is its primary) with one dual-stack socket: IPv4 clients appear as IPv4-mapped IPv6,
/// which these HTTP endpoints never look at. IPv4 only on a kernel without IPv6.
fn bind_both_families(port: u16, name: &str) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let (socket, address) = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
            Ok(socket) => {
                socket.set_only_v6(false)?;
                (socket, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
            }
            Err(_) => (
                Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?,
                SocketAddr::new(ANY, port),
            ),
        };
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        socket.set_nonblocking(true)?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    bind().with_context(|| format!("binding the {name} endpoint on port {port}"))
}

fn spawn_endpoints(
    state: &Arc<ProxyState>,
    admin: TcpListener,
    metrics: TcpListener,
    readiness: TcpListener,
    app_probers: AppProbers,
) {
    let admin_state = state.clone();
    tokio::spawn(http_server::serve(
        admin,
        "admin",
        state.clone(),
        move |req| admin::handle(admin_state.clone(), req),
    ));
    let metrics_state = state.clone();
    tokio::spawn(http_server::serve(
        metrics,
        "metrics",
        state.clone(),
        move |req| {
            let state = metrics_state.clone();
            async move {
                if req.uri().path() == "/stats/prometheus" {
                    respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        state.metrics.encode(),
                    )
                } else {
                    text(StatusCode::NOT_FOUND, "not found\n")
                }
            }
        },
    ));
    let readiness_state = state.clone();
    let probers = Arc::new(app_probers);
    tokio::spawn(http_server::serve(
        readiness,
        "readiness",
        state.clone(),
        move |req| {
            let state = readiness_state.clone();
            let probers = probers.clone();
            async move {
                let path = req.uri().path();
                if path == "/healthz/ready" {
                    readiness::response(&state)
                } else if path.starts_with(APP_HEALTH_PREFIX) {
                    match probers.check(path).await {
                        Some(status) => text(status, format!("{}\n", status.as_u16())),
                        None => text(StatusCode::NOT_FOUND, "no such application probe\n"),
                    }
                } else {
                    text(StatusCode::NOT_FOUND, "not found\n")
                }
            }
        },
    ));
}

async fn drain_on_signals(state: Arc<ProxyState>) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not drain");
        return;
    };
    tokio::select! {
        _ = term.recv() => state.drain.start("SIGTERM"),
        _ = int.recv() => state.drain.start("SIGINT"),
        () = state.drain.started() => {}
    }
}
