//! `ext-authz`: the demo external authorizer for AuthorizationPolicy action CUSTOM. Serves
//! Envoy's ext_authz HTTP protocol and its gRPC `Authorization/Check` service, each on its own
//! port, and decides by the checked request's `x-ext-authz` header (`allow`, `slow`, `fail`,
//! anything else denies; see `trellis_demo::ext_authz`).

use std::net::{IpAddr, SocketAddr};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "ext-authz",
    about = "Demo ext_authz authorizer (HTTP and gRPC)"
)]
struct Args {
    /// Port of the HTTP protocol.
    #[arg(long, default_value_t = 8000)]
    http_port: u16,
    /// Port of the gRPC protocol.
    #[arg(long, default_value_t = 9000)]
    grpc_port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (http, grpc) = trellis_demo::ext_authz::spawn(
        SocketAddr::new(args.bind, args.http_port),
        SocketAddr::new(args.bind, args.grpc_port),
    )
    .await?;
    trellis_demo::print_json(&serde_json::json!({"listening": {"http": http, "grpc": grpc}}));
    tokio::signal::ctrl_c().await?;
    Ok(())
}
