//! What capture needs from the pod's network namespace besides iptables: which IPv6 the pod has
//! (read from the addresses on its interfaces, so the init container and the CNI plugin decide
//! alike, from what the pod actually got rather than from what anybody says it should get), and
//! the `::6` loopback address the proxy's inbound passthrough uses as source.
//!
//! Both run on a short-lived thread that first enters the namespace when one is given (`setns`
//! affects only the calling thread), so the CNI plugin on the host can serve a pod's namespace
//! without a helper binary inside it.

use std::fs::File;
use std::io;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};
use trellis_config::wellknown::INBOUND_PASSTHROUGH_SOURCE_V6;

use crate::config::Ipv6Mode;

/// Interface index of `lo`: the kernel gives loopback index 1 in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// The kernel's list of IPv6 addresses (`/proc/net/if_inet6`) as the calling thread's network
/// namespace sees it; absent when the kernel has no IPv6.
const IPV6_ADDRESSES: &str = "/proc/thread-self/net/if_inet6";

/// `if_inet6` scope of link-local addresses (`IPV6_ADDR_LINKLOCAL >> 16`).
const SCOPE_LINK: &str = "20";

/// How the pod's IPv6 must be handled: captured when any interface but loopback holds an IPv6
/// address beyond link-local, rejected otherwise, nothing when the kernel has no IPv6.
pub fn ipv6_mode(netns: Option<&Path>) -> io::Result<Ipv6Mode> {
    in_netns(netns, || match std::fs::read_to_string(IPV6_ADDRESSES) {
        Ok(table) => Ok(ipv6_mode_of(&table)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ipv6Mode::Absent),
        Err(e) => Err(e),
    })
}

/// The decision from `if_inet6` text: one address per line, `address index prefix scope flags
/// device`.
fn ipv6_mode_of(table: &str) -> Ipv6Mode {
    let pod_address = table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, _, _, scope, _, device] if *device != "lo" && *scope != SCOPE_LINK)
    });
    if pod_address {
        Ipv6Mode::Capture
    } else {
        Ipv6Mode::Reject
    }
}

/// Assigns `::6/128` to `lo` (as `ip -6 addr add ::6/128 dev lo`), so that the proxy can bind it
/// as the source of its connections to the application; already present is fine.
pub fn add_inbound_passthrough_source(netns: Option<&Path>) -> io::Result<()> {
    in_netns(netns, || {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet6;
        message.header.prefix_len = 128;
        message.header.index = LOOPBACK_INDEX;
        message.attributes = vec![
            AddressAttribute::Local(INBOUND_PASSTHROUGH_SOURCE_V6.into()),
            AddressAttribute::Address(INBOUND_PASSTHROUGH_SOURCE_V6.into()),
        ];
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::NewAddress(message)),
        );
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);

        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.send(&buffer, 0)?;
        let (reply, _) = socket.recv_from_full()?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match reply.payload {
            NetlinkPayload::Error(error) => match error.code {
                None => Ok(()),
                Some(code) if -code.get() == nix::libc::EEXIST => Ok(()),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            },
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected netlink answer {other:?}"),
            )),
        }
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("adding {INBOUND_PASSTHROUGH_SOURCE_V6}/128 to lo: {e}"),
        )
    })
}

/// Runs `work` in the network namespace at `netns` (on a thread of its own that enters it), or
/// in the current one.
fn in_netns<T: Send>(
    netns: Option<&Path>,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(netns) = netns else {
        return work();
    };
    let namespace = File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&namespace, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_captured_only_where_the_pod_has_an_address_beyond_link_local() {
        let loopback = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link_local = "fe800000000000000c1a2bfffe3c4d5e 02 40 20 80     eth0\n";
        let global = "fd000000000000000000000000000002 02 40 00 80     eth0\n";
        let passthrough = "00000000000000000000000000000006 01 80 00 80       lo\n";
        let cases = [
            ("nothing", String::new(), Ipv6Mode::Reject),
            ("loopback only", loopback.to_owned(), Ipv6Mode::Reject),
            (
                "link-local only",
                format!("{loopback}{link_local}"),
                Ipv6Mode::Reject,
            ),
            (
                "our own ::6 on lo is not the pod's",
                format!("{loopback}{passthrough}{link_local}"),
                Ipv6Mode::Reject,
            ),
            (
                "a global address",
                format!("{loopback}{link_local}{global}"),
                Ipv6Mode::Capture,
            ),
        ];
        for (name, table, expected) in cases {
            assert_eq!(ipv6_mode_of(&table), expected, "{name}");
        }
    }
}
