//! The answers of `cluster-dns`: which cluster name a query asks for and what
//! it gets, as a response no larger than the transport allows. The wire format
//! (RFC 1035 messages, name compression, bounds on names and pointers) is
//! `hickory-proto`'s; this module keeps only the server's logic.

use std::net::Ipv4Addr;

use hickory_proto::ProtoError;
use hickory_proto::op::{Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable as _, BinDecoder};

/// The outcome of resolving a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these A records (none: the name exists without data
    /// of that type).
    Records(Vec<Ipv4Addr>),
    /// The name does not exist.
    NxDomain,
    /// Not our zone.
    Refused,
    /// Cannot answer yet (e.g. caches not synced).
    ServFail,
}

/// Where a queried name falls relative to the cluster domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterName {
    /// `<name>.<namespace>.svc.<domain>`.
    Service {
        /// Service name.
        name: String,
        /// Namespace.
        namespace: String,
    },
    /// `<a-b-c-d>.<namespace>.pod.<domain>`.
    Pod(Ipv4Addr),
    /// Some other name inside the cluster domain.
    InDomain,
    /// Outside the cluster domain.
    Outside,
}

/// Classifies `name` against the cluster `domain` (e.g. `cluster.local`).
/// Only exact `<svc>.<ns>.svc.<domain>` / `<ip>.<ns>.pod.<domain>` match.
pub fn classify(name: &Name, domain: &str) -> ClusterName {
    let lower: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    let domain: Vec<String> = domain
        .trim_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if lower.len() < domain.len() || lower[lower.len() - domain.len()..] != domain[..] {
        return ClusterName::Outside;
    }
    let rest = &lower[..lower.len() - domain.len()];
    match rest {
        [name, namespace, kind] if kind == "svc" => ClusterName::Service {
            name: name.clone(),
            namespace: namespace.clone(),
        },
        [ip, _namespace, kind] if kind == "pod" => match ip.replace('-', ".").parse() {
            Ok(ip) => ClusterName::Pod(ip),
            Err(_) => ClusterName::InDomain,
        },
        _ => ClusterName::InDomain,
    }
}

/// The source of service addresses.
pub trait ServiceLookup {
    /// Caches are synced; before that, cluster names get SERVFAIL.
    fn ready(&self) -> bool;
    /// The IPv4 addresses of a service (`Some(vec![])` if it exists
    /// without any), or `None` if there is no such service.
    fn service(&self, namespace: &str, name: &str) -> Option<Vec<Ipv4Addr>>;
}

/// Resolves `query` for the cluster `domain`.
pub fn resolve(query: &Query, domain: &str, lookup: &dyn ServiceLookup) -> Answer {
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        return Answer::Refused;
    }
    let with_type = |ips: Vec<Ipv4Addr>| match query.query_type() {
        RecordType::A | RecordType::ANY => Answer::Records(ips),
        _ => Answer::Records(Vec::new()),
    };
    match classify(query.name(), domain) {
        ClusterName::Outside => Answer::Refused,
        ClusterName::InDomain => Answer::NxDomain,
        ClusterName::Pod(ip) => with_type(vec![ip]),
        ClusterName::Service { name, namespace } => {
            if !lookup.ready() {
                return Answer::ServFail;
            }
            match lookup.service(&namespace, &name) {
                Some(ips) => with_type(ips),
                None => Answer::NxDomain,
            }
        }
    }
}

/// Builds the response to `request`'s `query`, at most `max_len` bytes long:
/// answers that do not fit are left out and TC is set. `None` if it cannot
/// be encoded.
pub fn build_response(
    request: &Metadata,
    query: &Query,
    answer: &Answer,
    ttl: u32,
    max_len: usize,
) -> Option<Vec<u8>> {
    let (rcode, ips): (ResponseCode, &[Ipv4Addr]) = match answer {
        Answer::Records(ips) => (ResponseCode::NoError, ips),
        Answer::NxDomain => (ResponseCode::NXDomain, &[]),
        Answer::Refused => (ResponseCode::Refused, &[]),
        Answer::ServFail => (ResponseCode::ServFail, &[]),
    };
    let mut response = response_to(request, rcode);
    response.metadata.authoritative = matches!(answer, Answer::Records(_) | Answer::NxDomain);
    response.add_query(query.clone());
    let with_answers = |count: usize| {
        let mut message = response.clone();
        message.metadata.truncation = count < ips.len();
        message.add_answers(
            ips[..count]
                .iter()
                .map(|ip| Record::from_rdata(query.name().clone(), ttl, RData::A(A(*ip)))),
        );
        message.to_vec().ok()
    };
    let full = with_answers(ips.len())?;
    if full.len() <= max_len {
        return Some(full);
    }
    // The most answers that fit, by bisection: encoded sizes grow with the count.
    let (mut fits, mut too_many) = (0, ips.len());
    while too_many - fits > 1 {
        let mid = fits + (too_many - fits) / 2;
        if with_answers(mid)?.len() <= max_len {
            fits = mid;
        } else {
            too_many = mid;
        }
    }
    with_answers(fits)
}

/// An empty response with `rcode` to the request whose header is `request`
/// (its id, opcode and RD and CD bits).
fn response_to(request: &Metadata, rcode: ResponseCode) -> Message {
    let mut response = Message::response(request.id, request.op_code);
    response.metadata = Metadata::response_from_request(request);
    response.metadata.response_code = rcode;
    response
}

/// A question-less response with `rcode`.
fn error_response(request: &Metadata, rcode: ResponseCode) -> Option<Vec<u8>> {
    response_to(request, rcode).to_vec().ok()
}

/// Answers one DNS message; `None` means send nothing: the packet is shorter
/// than a header or is itself a response. A query with another opcode than
/// QUERY gets NOTIMP; one that does not decode, or that does not ask exactly
/// one question, FORMERR.
pub fn handle_packet(
    packet: &[u8],
    domain: &str,
    lookup: &dyn ServiceLookup,
    ttl: u32,
    max_len: usize,
) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
    let request = header.metadata;
    if request.message_type == MessageType::Response {
        return None;
    }
    if request.op_code != OpCode::Query {
        return error_response(&request, ResponseCode::NotImp);
    }
    let query = match Message::from_vec(packet) {
        Ok(mut message) if message.queries.len() == 1 => message.queries.remove(0),
        _ => return error_response(&request, ResponseCode::FormErr),
    };
    let answer = resolve(&query, domain, lookup);
    build_response(&request, &query, &answer, ttl, max_len)
}

/// A recursion-desired query for `name` (used by tests and tools).
pub fn build_query(id: u16, name: &str, qtype: RecordType) -> Result<Vec<u8>, ProtoError> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name)?, qtype));
    message.to_vec()
}

/// The addresses of a response's A records (used by tests and tools).
pub fn a_records(response: &Message) -> Vec<Ipv4Addr> {
    response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Static {
        ready: bool,
        services: HashMap<(String, String), Vec<Ipv4Addr>>,
    }

    impl ServiceLookup for Static {
        fn ready(&self) -> bool {
            self.ready
        }
        fn service(&self, namespace: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
            self.services
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
        }
    }

    fn lookup() -> Static {
        let mut services = HashMap::new();
        services.insert(
            ("default".into(), "web".into()),
            vec![Ipv4Addr::new(10, 96, 0, 10)],
        );
        services.insert(("demo".into(), "headless".into()), vec![]);
        let many = (0..100).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
        services.insert(("demo".into(), "many".into()), many);
        Static {
            ready: true,
            services,
        }
    }

    fn ask(name: &str, qtype: RecordType) -> Message {
        let q = build_query(0x1234, name, qtype).unwrap();
        let r = handle_packet(&q, "cluster.local", &lookup(), 5, 512).expect("a response");
        assert!(r.len() <= 512);
        let r = Message::from_vec(&r).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        r
    }

    fn rcode(name: &str) -> ResponseCode {
        ask(name, RecordType::A).metadata.response_code
    }

    #[test]
    fn well_formed_round_trip() {
        let packet = build_query(7, "Web.Default.svc.Cluster.Local.", RecordType::A).unwrap();
        let request = Message::from_vec(&packet).unwrap();
        assert!(request.metadata.recursion_desired);
        let [query] = &request.queries[..] else {
            panic!("{request:?}")
        };
        assert_eq!(
            classify(query.name(), "cluster.local"),
            ClusterName::Service {
                name: "web".into(),
                namespace: "default".into()
            }
        );
        let resp = build_response(
            &request.metadata,
            query,
            &Answer::Records(vec![Ipv4Addr::new(1, 2, 3, 4)]),
            30,
            512,
        )
        .unwrap();
        let r = Message::from_vec(&resp).unwrap();
        assert_eq!(r.metadata.id, 7);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative && !r.metadata.truncation);
        assert!(r.metadata.recursion_desired);
        assert_eq!(r.queries, request.queries);
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(1, 2, 3, 4)]);
        assert_eq!(r.answers[0].ttl, 30);
        // The question is echoed with the original case.
        assert_eq!(&resp[13..16], b"Web");
    }

    #[test]
    fn resolution() {
        let r = ask("web.default.svc.cluster.local", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 96, 0, 10)]);
        let r = ask("web.default.svc.cluster.local", RecordType::AAAA);
        assert_eq!(
            (r.metadata.response_code, r.answers.len()),
            (ResponseCode::NoError, 0)
        );
        // Search-list expansions that are not exact matches.
        assert_eq!(
            rcode("web.default.svc.cluster.local.default.svc.cluster.local"),
            ResponseCode::NXDomain
        );
        assert_eq!(rcode("web.svc.cluster.local"), ResponseCode::NXDomain);
        assert_eq!(
            rcode("nope.default.svc.cluster.local"),
            ResponseCode::NXDomain
        );
        assert_eq!(rcode("cluster.local"), ResponseCode::NXDomain);
        assert_eq!(rcode("example.com"), ResponseCode::Refused);
        assert_eq!(rcode("local"), ResponseCode::Refused);
        assert_eq!(rcode("."), ResponseCode::Refused);
        let r = ask("headless.demo.svc.cluster.local", RecordType::A);
        assert_eq!(
            (r.metadata.response_code, r.answers.len()),
            (ResponseCode::NoError, 0)
        );
        let r = ask("10-1-2-3.demo.pod.cluster.local", RecordType::A);
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 1, 2, 3)]);
        assert_eq!(
            rcode("10-1-2.demo.pod.cluster.local"),
            ResponseCode::NXDomain
        );
        // Many answers are cut to fit 512 bytes, with TC set.
        let r = ask("many.demo.svc.cluster.local", RecordType::A);
        assert!(r.metadata.truncation);
        let fitted = a_records(&r).len();
        assert!(fitted > 0 && fitted < 100, "{fitted}");
        // As many as fit: one more would not.
        let q = build_query(1, "many.demo.svc.cluster.local", RecordType::A).unwrap();
        let request = Message::from_vec(&q).unwrap();
        let ips = lookup().services[&("demo".into(), "many".into())][..=fitted].to_vec();
        let one_more = build_response(
            &request.metadata,
            &request.queries[0],
            &Answer::Records(ips),
            5,
            usize::MAX,
        )
        .unwrap();
        assert!(one_more.len() > 512, "{}", one_more.len());
        let full = handle_packet(&q, "cluster.local", &lookup(), 5, 65535).unwrap();
        let r = Message::from_vec(&full).unwrap();
        assert!(!r.metadata.truncation);
        assert_eq!(a_records(&r).len(), 100);
    }

    #[test]
    fn servfail_until_ready() {
        let mut l = lookup();
        l.ready = false;
        let q = build_query(1, "web.default.svc.cluster.local", RecordType::A).unwrap();
        let r = handle_packet(&q, "cluster.local", &l, 5, 512).unwrap();
        assert_eq!(
            Message::from_vec(&r).unwrap().metadata.response_code,
            ResponseCode::ServFail
        );
    }

    #[test]
    fn malformed_packets() {
        let l = lookup();
        let handle = |p: &[u8]| handle_packet(p, "cluster.local", &l, 5, 512);
        let rcode_of = |p: &[u8]| {
            let r = Message::from_vec(&handle(p).expect("an answer")).unwrap();
            assert_eq!(r.metadata.id, u16::from_be_bytes([p[0], p[1]]));
            r.metadata.response_code
        };
        // Truncated headers: silently dropped.
        for n in 0..12 {
            assert_eq!(handle(&vec![0u8; n]), None);
        }
        let good = build_query(9, "web.default.svc.cluster.local", RecordType::A).unwrap();
        // Every truncation of a good query past the header is answered FORMERR.
        for n in 12..good.len() {
            assert_eq!(rcode_of(&good[..n]), ResponseCode::FormErr, "cut {n}");
        }
        // A response is ignored.
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(handle(&resp), None);
        let question = |name: &[u8]| {
            let mut packet = good[..12].to_vec();
            packet.extend_from_slice(name);
            packet.extend_from_slice(&[0, 1, 0, 1]);
            packet
        };
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        for (what, name) in [
            ("label running past the end", &[60, b'a', b'b', 0][..]),
            ("reserved label type", &[0x40, 0]),
            ("pointer to itself", &[0xC0, 12]),
            ("two-pointer loop", &[1, b'a', 0xC0, 12]),
            ("pointer past the end", &[0xFF, 0xFF]),
            ("name over 255 bytes", &long),
        ] {
            assert_eq!(rcode_of(&question(name)), ResponseCode::FormErr, "{what}");
        }
        // A valid pointer (into the header bytes) gets an answer too.
        assert!(handle(&question(&[0xC0, 11])).is_some());
        // Wrong question counts.
        for count in [0, 2] {
            let mut wrong = good.clone();
            wrong[5] = count;
            assert_eq!(rcode_of(&wrong), ResponseCode::FormErr, "{count} questions");
        }
        // Non-QUERY opcode.
        let mut notify = good.clone();
        notify[2] = (4 << 3) | 1;
        assert_eq!(rcode_of(&notify), ResponseCode::NotImp);
        // A trailing EDNS OPT record does not get in the way.
        let mut edns = good.clone();
        edns[11] = 1;
        edns.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        let r = Message::from_vec(&handle(&edns).unwrap()).unwrap();
        assert_eq!(a_records(&r).len(), 1);
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random packets, with a valid header prefix so
        // the name parser gets exercised.
        let l = lookup();
        let mut x: u64 = 0x2545F4914F6CDD1D;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 80) as usize;
            let mut p: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 7) & 0xFF) as u8)
                .collect();
            if p.len() >= 12 {
                p[2] &= 0x07;
                p[4] = 0;
                p[5] = 1;
            }
            let _ = handle_packet(&p, "cluster.local", &l, 5, 512);
        }
    }
}
