//! `cluster-dns`: a minimal authoritative DNS server for the Trellis test
//! cluster (there is no CoreDNS there). It watches Services (and
//! EndpointSlices, for headless Services) and answers, over UDP and TCP,
//! A queries for `<svc>.<ns>.svc.<domain>` with the ClusterIP (the ready
//! endpoint addresses for headless Services) and `<a-b-c-d>.<ns>.pod.<domain>`
//! with that address. Unknown names inside the domain get NXDOMAIN, names
//! outside it REFUSED (there is no upstream), other query types for known
//! names an empty NOERROR, and everything SERVFAIL until the Service cache
//! has synced. `--no-kube` with `--service` entries runs it without a
//! cluster, for tests.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use hickory_proto::op::Message;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use trellis_demo::dns::{ServiceLookup, handle_packet};
use trellis_demo::print_json;

#[derive(Debug, Parser)]
#[command(
    name = "cluster-dns",
    about = "Minimal DNS server for Kubernetes Services"
)]
struct Args {
    /// UDP and TCP port to listen on.
    #[arg(long, default_value_t = 53)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// TTL of answers, in seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// Do not talk to Kubernetes; answer only the --service entries.
    #[arg(long)]
    no_kube: bool,
    /// Static service `namespace/name=ip` (repeatable, several ips allowed).
    #[arg(long = "service")]
    services: Vec<String>,
    /// Do not watch EndpointSlices (headless Services then have no addresses).
    #[arg(long)]
    no_endpoint_slices: bool,
    /// Log every query to stdout.
    #[arg(long)]
    log_queries: bool,
}

type StaticServices = HashMap<(String, String), Vec<Ipv4Addr>>;

struct Lookup {
    statics: StaticServices,
    services: Option<Store<Service>>,
    slices: Option<Store<EndpointSlice>>,
    ready: Arc<AtomicBool>,
}

impl Lookup {
    fn headless_addresses(&self, namespace: &str, name: &str) -> Vec<Ipv4Addr> {
        let Some(slices) = &self.slices else {
            return Vec::new();
        };
        let mut ips: Vec<Ipv4Addr> = slices
            .state()
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .is_some_and(|n| n == name)
                    && s.address_type == "IPv4"
            })
            .flat_map(|s| s.endpoints.clone().unwrap_or_default())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses)
            .filter_map(|a| a.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

impl ServiceLookup for Lookup {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn service(&self, namespace: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
        if let Some(ips) = self.statics.get(&(namespace.to_string(), name.to_string())) {
            return Some(ips.clone());
        }
        let svc = self
            .services
            .as_ref()?
            .get(&ObjectRef::new(name).within(namespace))?;
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Some(Vec::new());
        }
        let mut raw = spec.cluster_ips.unwrap_or_default();
        if raw.is_empty() {
            raw.extend(spec.cluster_ip);
        }
        if raw.iter().any(|ip| ip == "None") {
            return Some(self.headless_addresses(namespace, name));
        }
        Some(raw.iter().filter_map(|ip| ip.parse().ok()).collect())
    }
}

fn parse_static(entries: &[String]) -> anyhow::Result<StaticServices> {
    let mut map = StaticServices::new();
    for entry in entries {
        let (key, ip) = entry
            .split_once('=')
            .with_context(|| format!("--service {entry:?}: want namespace/name=ip"))?;
        let (ns, name) = key
            .split_once('/')
            .with_context(|| format!("--service {entry:?}: want namespace/name=ip"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("--service {entry:?}: bad IPv4 address"))?;
        map.entry((ns.to_ascii_lowercase(), name.to_ascii_lowercase()))
            .or_default()
            .push(ip);
    }
    Ok(map)
}

async fn start_watches(
    no_slices: bool,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<(Store<Service>, Option<Store<EndpointSlice>>)> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or kubeconfig)")?;
    let services = watched_store(Api::<Service>::all(client.clone()), "service");
    let reader = services.clone();
    tokio::spawn(async move {
        if reader.wait_until_ready().await.is_ok() {
            ready.store(true, Ordering::Relaxed);
            print_json(&json!({"msg": "services synced", "count": reader.len()}));
        }
    });
    let slices = if no_slices {
        None
    } else {
        Some(watched_store(
            Api::<EndpointSlice>::all(client),
            "endpointslice",
        ))
    };
    Ok((services, slices))
}

struct Ctx {
    lookup: Lookup,
    domain: String,
    ttl: u32,
    log: bool,
}

impl Ctx {
    fn answer(&self, packet: &[u8], max_len: usize, peer: SocketAddr) -> Option<Vec<u8>> {
        let resp = handle_packet(packet, &self.domain, &self.lookup, self.ttl, max_len);
        if self.log {
            let query = Message::from_vec(packet)
                .ok()
                .and_then(|m| m.queries.into_iter().next());
            let name = query.as_ref().map(|q| q.name().to_lowercase().to_string());
            let qtype = query.map(|q| u16::from(q.query_type()));
            let rcode = resp
                .as_deref()
                .and_then(|r| Message::from_vec(r).ok())
                .map(|r| u16::from(r.metadata.response_code));
            print_json(
                &json!({"peer": peer.to_string(), "q": name, "type": qtype, "rcode": rcode}),
            );
        }
        resp
    }
}

async fn serve_udp(socket: UdpSocket, ctx: Arc<Ctx>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("udp receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Some(resp) = ctx.answer(&buf[..n], 512, peer)
            && let Err(e) = socket.send_to(&resp, peer).await
        {
            eprintln!("udp send to {peer} failed: {e}");
        }
    }
}

async fn tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
) -> std::io::Result<()> {
    // A bounded number of messages per connection, each within an idle timeout.
    for _ in 0..1000 {
        let len = match tokio::time::timeout(Duration::from_secs(10), stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return Ok(()),
        };
        let mut msg = vec![0u8; len];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let Some(resp) = ctx.answer(&msg, 65535, peer) else {
            return Ok(());
        };
        let resp_len = u16::try_from(resp.len()).unwrap_or(u16::MAX);
        stream.write_u16(resp_len).await?;
        stream.write_all(&resp[..usize::from(resp_len)]).await?;
    }
    Ok(())
}

async fn serve_tcp(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _ = tcp_connection(stream, peer, ctx).await;
                });
            }
            Err(e) => {
                eprintln!("tcp accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let statics = parse_static(&args.services)?;
    let domain_ok = args
        .domain
        .trim_matches('.')
        .split('.')
        .all(|label| !label.is_empty() && label.len() <= 63);
    if !domain_ok || args.domain.len() > 200 {
        anyhow::bail!("--domain {:?} is not a valid DNS name", args.domain);
    }
    let ready = Arc::new(AtomicBool::new(args.no_kube));
    let (services, slices) = if args.no_kube {
        (None, None)
    } else {
        let (services, slices) = start_watches(args.no_endpoint_slices, ready.clone()).await?;
        (Some(services), slices)
    };
    let addr = SocketAddr::new(args.bind, args.port);
    let udp = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding UDP {addr}"))?;
    let udp_addr = udp.local_addr()?;
    // With --port 0, serve TCP on the port the UDP socket got.
    let tcp_addr = SocketAddr::new(args.bind, udp_addr.port());
    let tcp = TcpListener::bind(tcp_addr)
        .await
        .with_context(|| format!("binding TCP {tcp_addr}"))?;
    print_json(
        &json!({"msg": "listening", "addr": udp_addr.to_string(), "domain": args.domain, "kube": !args.no_kube}),
    );
    let ctx = Arc::new(Ctx {
        lookup: Lookup {
            statics,
            services,
            slices,
            ready,
        },
        domain: args.domain.trim_matches('.').to_ascii_lowercase(),
        ttl: args.ttl,
        log: args.log_queries,
    });
    let udp_task = tokio::spawn(serve_udp(udp, ctx.clone()));
    let tcp_task = tokio::spawn(serve_tcp(tcp, ctx));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    udp_task.abort();
    tcp_task.abort();
    Ok(())
}

/// A store kept in sync with every object `api` lists; watch errors are logged and retried.
fn watched_store<K>(api: Api<K>, what: &'static str) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(move |event| async move {
        if let Err(e) = event {
            eprintln!(
                "{}",
                json!({"msg": format!("{what} watch error"), "error": e.to_string()})
            );
        }
    }));
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_services() {
        let m = parse_static(&["demo/Web=10.0.0.1".into(), "demo/web=10.0.0.2".into()]).unwrap();
        assert_eq!(
            m[&("demo".to_string(), "web".to_string())],
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert!(parse_static(&["web=10.0.0.1".into()]).is_err());
        assert!(parse_static(&["demo/web=::1".into()]).is_err());
    }
}
