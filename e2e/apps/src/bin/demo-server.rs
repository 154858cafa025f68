//! `demo-server`: the Trellis demo workload. Serves HTTP/1.1 and
//! prior-knowledge HTTP/2 on one port and answers every request with a JSON
//! description of itself and the request; behaviour (status, failure rate,
//! delay, hang, body size) is controlled per request by query parameters or
//! `x-demo-*` headers. Also does streaming `/echo`, gRPC echo (unary and
//! bidi on any method; server streaming on `…/Stream`, which sends its one
//! request message back `x-demo-stream-messages` times), WebSocket echo and,
//! optionally, an opaque TCP echo on a second port and (`--documents`) small
//! documents stored by `PUT /documents/<name>` and answered to `GET`.
//!
//! `--defaults <query-string>` (env `DEMO_DEFAULTS`) sets controls for every
//! request that does not set the same control itself: `--defaults
//! status=503` makes a "bad" pod, `--defaults delay=2s` a slow one, while a
//! request can still override (`?status=200`). `/healthz` ignores them, so
//! such a pod stays Ready.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_api::istio::duration;
use trellis_demo::control::Controls;
use trellis_demo::print_json;
use trellis_demo::server::{Identity, ServerState, serve_http, serve_tcp_echo};

#[derive(Debug, Parser)]
#[command(
    name = "demo-server",
    about = "Trellis demo HTTP/gRPC/WebSocket/TCP echo server"
)]
struct Args {
    /// HTTP port (HTTP/1.1 and h2c prior knowledge); 0 picks a free port.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Also serve an opaque TCP echo on this port (0 picks a free port).
    #[arg(long)]
    tcp_echo_port: Option<u16>,
    /// On the TCP echo port, send `hello <name>\n` first (server speaks first).
    #[arg(long)]
    tcp_greeting: bool,
    /// Do not log a line per request.
    #[arg(long)]
    quiet: bool,
    /// Default controls for every request, as a query string
    /// (`status=503&delay=2s`); a request's own controls win.
    #[arg(long, env = "DEMO_DEFAULTS", default_value = "", value_parser = Controls::parse_defaults)]
    defaults: Controls,
    /// Also keep small documents: `PUT /documents/<name>` stores the body and
    /// `GET /documents/<name>` answers it (a key set a test rotates).
    #[arg(long)]
    documents: bool,
    /// How long to drain connections after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    grace: Duration,
}

async fn shutdown_signal(tx: watch::Sender<bool>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot install SIGTERM handler: {e}");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = tx.send(true);
}

fn wait_for(rx: &watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + use<> {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let identity = Identity::from_env();
    let http = TcpListener::bind(SocketAddr::new(args.bind, args.port))
        .await
        .with_context(|| format!("binding HTTP port {}", args.port))?;
    let http_addr = http.local_addr()?;
    let tcp = match args.tcp_echo_port {
        Some(port) => Some(
            TcpListener::bind(SocketAddr::new(args.bind, port))
                .await
                .with_context(|| format!("binding TCP echo port {port}"))?,
        ),
        None => None,
    };
    let tcp_addr = match &tcp {
        Some(l) => Some(l.local_addr()?.to_string()),
        None => None,
    };
    print_json(&json!({
        "msg": "listening",
        "http": http_addr.to_string(),
        "tcpEcho": tcp_addr,
        "name": identity.name,
        "version": identity.version,
        "defaults": format!("{:?}", args.defaults),
    }));

    let (tx, rx) = watch::channel(false);
    tokio::spawn(shutdown_signal(tx));
    if let Some(listener) = tcp {
        let greeting = args.tcp_greeting.then(|| identity.name.clone());
        tokio::spawn(serve_tcp_echo(listener, greeting, wait_for(&rx)));
    }
    let mut state = ServerState::new(identity, args.quiet).with_default_controls(args.defaults);
    if args.documents {
        state = state.with_documents();
    }
    let state = Arc::new(state);
    serve_http(http, state, wait_for(&rx), args.grace).await;
    print_json(&json!({"msg": "stopped"}));
    Ok(())
}
