//! A minimal DNS implementation (RFC 1035) for `cluster-dns`: query parsing,
//! response building and cluster-name resolution. Parsing is bounded and
//! never panics: every read is checked, names are limited to 255 bytes and
//! compression pointers to a fixed number of jumps.

use std::net::Ipv4Addr;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Query type ANY.
pub const TYPE_ANY: u16 = 255;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// Class ANY.
pub const CLASS_ANY: u16 = 255;

/// Response codes.
pub const RCODE_NOERROR: u8 = 0;
/// Format error.
pub const RCODE_FORMERR: u8 = 1;
/// Server failure.
pub const RCODE_SERVFAIL: u8 = 2;
/// Name does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Not implemented.
pub const RCODE_NOTIMP: u8 = 4;
/// Refused.
pub const RCODE_REFUSED: u8 = 5;

const HEADER_LEN: usize = 12;
const MAX_NAME_LEN: usize = 255;
const MAX_POINTER_JUMPS: usize = 32;

/// Why a packet is not a usable query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header.
    TooShort,
    /// The QR bit is set: a response, not a query.
    NotAQuery,
    /// Opcode other than QUERY.
    UnsupportedOpcode(u8),
    /// QDCOUNT is not 1.
    BadQuestionCount(u16),
    /// The question runs past the end of the packet.
    Truncated,
    /// A label with the reserved 0x40/0x80 type bits.
    BadLabel,
    /// Too many compression pointer jumps.
    PointerLoop,
    /// Name longer than 255 bytes.
    NameTooLong,
}

/// A parsed query (header fields and its single question).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction id.
    pub id: u16,
    /// Opcode (0 = QUERY).
    pub opcode: u8,
    /// Recursion desired.
    pub rd: bool,
    /// Question name labels, as received (case preserved).
    pub labels: Vec<Vec<u8>>,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
}

impl Query {
    /// The name in dotted form, lower-cased, without the trailing dot.
    pub fn name(&self) -> String {
        self.labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(".")
    }
}

fn read_u16(packet: &[u8], pos: usize) -> Result<u16, ParseError> {
    match packet.get(pos..pos + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(ParseError::Truncated),
    }
}

/// Reads a (possibly compressed) name at `offset`; returns its labels and
/// the offset just past the name at its original position.
pub fn read_name(packet: &[u8], offset: usize) -> Result<(Vec<Vec<u8>>, usize), ParseError> {
    let mut labels = Vec::new();
    let mut pos = offset;
    let mut end = None;
    let mut jumps = 0;
    let mut total = 1; // the root label
    loop {
        let len = *packet.get(pos).ok_or(ParseError::Truncated)?;
        match len & 0xC0 {
            0x00 => {
                if len == 0 {
                    return Ok((labels, end.unwrap_or(pos + 1)));
                }
                let len = usize::from(len);
                let label = packet
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(ParseError::Truncated)?;
                total += len + 1;
                if total > MAX_NAME_LEN {
                    return Err(ParseError::NameTooLong);
                }
                labels.push(label.to_vec());
                pos += len + 1;
            }
            0xC0 => {
                let low = *packet.get(pos + 1).ok_or(ParseError::Truncated)?;
                jumps += 1;
                if jumps > MAX_POINTER_JUMPS {
                    return Err(ParseError::PointerLoop);
                }
                end.get_or_insert(pos + 2);
                pos = (usize::from(len & 0x3F) << 8) | usize::from(low);
            }
            _ => return Err(ParseError::BadLabel),
        }
    }
}

/// Parses a query packet: header plus exactly one question. Answer,
/// authority and additional sections (e.g. an EDNS OPT record) are ignored.
pub fn parse_query(packet: &[u8]) -> Result<Query, ParseError> {
    if packet.len() < HEADER_LEN {
        return Err(ParseError::TooShort);
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    if flags & 0x8000 != 0 {
        return Err(ParseError::NotAQuery);
    }
    let opcode = ((flags >> 11) & 0x0F) as u8;
    if opcode != 0 {
        return Err(ParseError::UnsupportedOpcode(opcode));
    }
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    if qdcount != 1 {
        return Err(ParseError::BadQuestionCount(qdcount));
    }
    let (labels, pos) = read_name(packet, HEADER_LEN)?;
    let qtype = read_u16(packet, pos)?;
    let qclass = read_u16(packet, pos + 2)?;
    Ok(Query {
        id,
        opcode,
        rd: flags & 0x0100 != 0,
        labels,
        qtype,
        qclass,
    })
}

/// Encodes an uncompressed name.
pub fn encode_name(labels: &[Vec<u8>], out: &mut Vec<u8>) {
    for label in labels {
        // Labels come from `read_name`, so each is at most 63 bytes.
        out.push(label.len().min(63) as u8);
        out.extend_from_slice(&label[..label.len().min(63)]);
    }
    out.push(0);
}

/// Builds a query packet (used by tests and tools).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    let labels: Vec<Vec<u8>> = name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    encode_name(&labels, &mut out);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

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
    /// Opcode or feature not implemented.
    NotImp,
}

fn header(id: u16, opcode: u8, aa: bool, tc: bool, rd: bool, rcode: u8) -> [u8; 4] {
    let mut flags: u16 = 0x8000 | (u16::from(opcode & 0x0F) << 11) | u16::from(rcode & 0x0F);
    if aa {
        flags |= 0x0400;
    }
    if tc {
        flags |= 0x0200;
    }
    if rd {
        flags |= 0x0100;
    }
    let [i0, i1] = id.to_be_bytes();
    let [f0, f1] = flags.to_be_bytes();
    [i0, i1, f0, f1]
}

/// Builds the response to `query`, at most `max_len` bytes long (answers
/// that do not fit are left out and TC is set).
pub fn build_response(query: &Query, answer: &Answer, ttl: u32, max_len: usize) -> Vec<u8> {
    let (rcode, records): (u8, &[Ipv4Addr]) = match answer {
        Answer::Records(ips) => (RCODE_NOERROR, ips),
        Answer::NxDomain => (RCODE_NXDOMAIN, &[]),
        Answer::Refused => (RCODE_REFUSED, &[]),
        Answer::ServFail => (RCODE_SERVFAIL, &[]),
        Answer::NotImp => (RCODE_NOTIMP, &[]),
    };
    let authoritative = matches!(answer, Answer::Records(_) | Answer::NxDomain);
    let mut body = Vec::with_capacity(64 + records.len() * 16);
    encode_name(&query.labels, &mut body);
    body.extend_from_slice(&query.qtype.to_be_bytes());
    body.extend_from_slice(&query.qclass.to_be_bytes());
    let mut count: u16 = 0;
    let mut truncated = false;
    for ip in records {
        if HEADER_LEN + body.len() + 16 > max_len || count == u16::MAX {
            truncated = true;
            break;
        }
        body.extend_from_slice(&[0xC0, 0x0C]); // pointer to the question name
        body.extend_from_slice(&TYPE_A.to_be_bytes());
        body.extend_from_slice(&CLASS_IN.to_be_bytes());
        body.extend_from_slice(&ttl.to_be_bytes());
        body.extend_from_slice(&4u16.to_be_bytes());
        body.extend_from_slice(&ip.octets());
        count += 1;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header(
        query.id,
        query.opcode,
        authoritative,
        truncated,
        query.rd,
        rcode,
    ));
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&body);
    out
}

/// A header-only error response for a packet whose question could not be
/// used; `None` if the packet is too short or is itself a response.
pub fn error_response(packet: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if packet.len() < HEADER_LEN || packet[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let opcode = (packet[2] >> 3) & 0x0F;
    let rd = packet[2] & 0x01 != 0;
    let mut out = header(id, opcode, false, false, rd, rcode).to_vec();
    out.extend_from_slice(&[0; 8]);
    Some(out)
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

/// Classifies `labels` against the cluster `domain` (e.g. `cluster.local`).
/// Only exact `<svc>.<ns>.svc.<domain>` / `<ip>.<ns>.pod.<domain>` match.
pub fn classify(labels: &[Vec<u8>], domain: &str) -> ClusterName {
    let lower: Vec<String> = labels
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
    if query.opcode != 0 {
        return Answer::NotImp;
    }
    if query.qclass != CLASS_IN && query.qclass != CLASS_ANY {
        return Answer::Refused;
    }
    let with_type = |ips: Vec<Ipv4Addr>| match query.qtype {
        TYPE_A | TYPE_ANY => Answer::Records(ips),
        _ => Answer::Records(Vec::new()),
    };
    match classify(&query.labels, domain) {
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

/// Answers one DNS message; `None` means send nothing.
pub fn handle_packet(
    packet: &[u8],
    domain: &str,
    lookup: &dyn ServiceLookup,
    ttl: u32,
    max_len: usize,
) -> Option<Vec<u8>> {
    match parse_query(packet) {
        Ok(query) => {
            let answer = resolve(&query, domain, lookup);
            Some(build_response(&query, &answer, ttl, max_len))
        }
        Err(ParseError::TooShort | ParseError::NotAQuery) => None,
        Err(ParseError::UnsupportedOpcode(_)) => error_response(packet, RCODE_NOTIMP),
        Err(_) => error_response(packet, RCODE_FORMERR),
    }
}

/// A parsed response (for tests and tools): rcode, flags and A records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    /// Transaction id.
    pub id: u16,
    /// Response code.
    pub rcode: u8,
    /// Authoritative answer.
    pub aa: bool,
    /// Truncated.
    pub tc: bool,
    /// The question name, lower-cased.
    pub question: Option<String>,
    /// A records in the answer section.
    pub addrs: Vec<Ipv4Addr>,
    /// Number of answer records of any type.
    pub answer_count: u16,
}

/// Parses a response, bounded like [`parse_query`].
pub fn parse_response(packet: &[u8]) -> Result<ParsedResponse, ParseError> {
    if packet.len() < HEADER_LEN {
        return Err(ParseError::TooShort);
    }
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    let ancount = u16::from_be_bytes([packet[6], packet[7]]);
    let mut pos = HEADER_LEN;
    let mut question = None;
    for _ in 0..qdcount {
        let (labels, end) = read_name(packet, pos)?;
        question = Some(
            labels
                .iter()
                .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join("."),
        );
        pos = end + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        let (_, end) = read_name(packet, pos)?;
        let rtype = read_u16(packet, end)?;
        let rdlen = usize::from(read_u16(packet, end + 8)?);
        let rdata = packet
            .get(end + 10..end + 10 + rdlen)
            .ok_or(ParseError::Truncated)?;
        if rtype == TYPE_A && rdlen == 4 {
            addrs.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        pos = end + 10 + rdlen;
    }
    Ok(ParsedResponse {
        id: u16::from_be_bytes([packet[0], packet[1]]),
        rcode: (flags & 0x0F) as u8,
        aa: flags & 0x0400 != 0,
        tc: flags & 0x0200 != 0,
        question,
        addrs,
        answer_count: ancount,
    })
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

    fn ask(name: &str, qtype: u16) -> ParsedResponse {
        let q = build_query(0x1234, name, qtype);
        let r = handle_packet(&q, "cluster.local", &lookup(), 5, 512).expect("a response");
        assert!(r.len() <= 512);
        parse_response(&r).unwrap()
    }

    #[test]
    fn well_formed_round_trip() {
        let packet = build_query(7, "Web.Default.svc.Cluster.Local.", TYPE_A);
        let q = parse_query(&packet).unwrap();
        assert_eq!(q.id, 7);
        assert!(q.rd);
        assert_eq!(q.name(), "web.default.svc.cluster.local");
        assert_eq!((q.qtype, q.qclass), (TYPE_A, CLASS_IN));
        let resp = build_response(
            &q,
            &Answer::Records(vec![Ipv4Addr::new(1, 2, 3, 4)]),
            30,
            512,
        );
        let r = parse_response(&resp).unwrap();
        assert_eq!(r.id, 7);
        assert_eq!(r.rcode, RCODE_NOERROR);
        assert!(r.aa && !r.tc);
        assert_eq!(r.question.as_deref(), Some("web.default.svc.cluster.local"));
        assert_eq!(r.addrs, vec![Ipv4Addr::new(1, 2, 3, 4)]);
        // The question is echoed with the original case.
        assert_eq!(&resp[13..16], b"Web");
    }

    #[test]
    fn resolution() {
        let r = ask("web.default.svc.cluster.local", TYPE_A);
        assert_eq!(
            (r.rcode, r.addrs.clone()),
            (RCODE_NOERROR, vec![Ipv4Addr::new(10, 96, 0, 10)])
        );
        let r = ask("web.default.svc.cluster.local", TYPE_AAAA);
        assert_eq!((r.rcode, r.answer_count), (RCODE_NOERROR, 0));
        // Search-list expansions that are not exact matches.
        assert_eq!(
            ask(
                "web.default.svc.cluster.local.default.svc.cluster.local",
                TYPE_A
            )
            .rcode,
            RCODE_NXDOMAIN
        );
        assert_eq!(ask("web.svc.cluster.local", TYPE_A).rcode, RCODE_NXDOMAIN);
        assert_eq!(
            ask("nope.default.svc.cluster.local", TYPE_A).rcode,
            RCODE_NXDOMAIN
        );
        assert_eq!(ask("cluster.local", TYPE_A).rcode, RCODE_NXDOMAIN);
        assert_eq!(ask("example.com", TYPE_A).rcode, RCODE_REFUSED);
        assert_eq!(ask("local", TYPE_A).rcode, RCODE_REFUSED);
        assert_eq!(ask("", TYPE_A).rcode, RCODE_REFUSED);
        let r = ask("headless.demo.svc.cluster.local", TYPE_A);
        assert_eq!((r.rcode, r.answer_count), (RCODE_NOERROR, 0));
        let r = ask("10-1-2-3.demo.pod.cluster.local", TYPE_A);
        assert_eq!(r.addrs, vec![Ipv4Addr::new(10, 1, 2, 3)]);
        assert_eq!(
            ask("10-1-2.demo.pod.cluster.local", TYPE_A).rcode,
            RCODE_NXDOMAIN
        );
        // Many answers are cut to fit 512 bytes, with TC set.
        let r = ask("many.demo.svc.cluster.local", TYPE_A);
        assert!(r.tc);
        assert!(!r.addrs.is_empty() && r.addrs.len() < 100);
        let q = build_query(1, "many.demo.svc.cluster.local", TYPE_A);
        let full = handle_packet(&q, "cluster.local", &lookup(), 5, 65535).unwrap();
        let r = parse_response(&full).unwrap();
        assert!(!r.tc);
        assert_eq!(r.addrs.len(), 100);
    }

    #[test]
    fn servfail_until_ready() {
        let mut l = lookup();
        l.ready = false;
        let q = build_query(1, "web.default.svc.cluster.local", TYPE_A);
        let r = parse_response(&handle_packet(&q, "cluster.local", &l, 5, 512).unwrap()).unwrap();
        assert_eq!(r.rcode, RCODE_SERVFAIL);
    }

    #[test]
    fn malformed_packets() {
        let l = lookup();
        let handle = |p: &[u8]| handle_packet(p, "cluster.local", &l, 5, 512);
        // Truncated headers: silently dropped.
        for n in 0..12 {
            assert_eq!(handle(&vec![0u8; n]), None);
        }
        let good = build_query(9, "web.default.svc.cluster.local", TYPE_A);
        // Every truncation of a good query must not panic; past the header
        // it is answered FORMERR.
        for n in 12..good.len() {
            let r = handle(&good[..n]).unwrap();
            assert_eq!(parse_response(&r).unwrap().rcode, RCODE_FORMERR, "cut {n}");
        }
        // A response is ignored.
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(handle(&resp), None);
        // Bad label length (runs past the end).
        let mut bad = good[..12].to_vec();
        bad.extend_from_slice(&[60, b'a', b'b', 0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&bad), Err(ParseError::Truncated));
        assert_eq!(
            parse_response(&handle(&bad).unwrap()).unwrap().rcode,
            RCODE_FORMERR
        );
        // Reserved label type.
        let mut bad = good[..12].to_vec();
        bad.extend_from_slice(&[0x40, 0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&bad), Err(ParseError::BadLabel));
        // Pointer to itself, and a two-pointer loop.
        let mut looped = good[..12].to_vec();
        looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&looped), Err(ParseError::PointerLoop));
        let mut looped = good[..12].to_vec();
        looped.extend_from_slice(&[1, b'a', 0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&looped), Err(ParseError::PointerLoop));
        // Pointer past the end.
        let mut far = good[..12].to_vec();
        far.extend_from_slice(&[0xFF, 0xFF, 0, 1, 0, 1]);
        assert_eq!(parse_query(&far), Err(ParseError::Truncated));
        // A valid pointer (into the header bytes) does not crash either.
        let mut ptr = good[..12].to_vec();
        ptr.extend_from_slice(&[0xC0, 11, 0, 1, 0, 1]);
        assert!(handle(&ptr).is_some());
        // Over-long name.
        let mut long = good[..12].to_vec();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&long), Err(ParseError::NameTooLong));
        // Wrong question counts.
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(ParseError::BadQuestionCount(2)));
        let mut zero = good.clone();
        zero[5] = 0;
        assert_eq!(
            parse_response(&handle(&zero).unwrap()).unwrap().rcode,
            RCODE_FORMERR
        );
        // Non-QUERY opcode.
        let mut notify = good.clone();
        notify[2] = (4 << 3) | 1;
        assert_eq!(
            parse_response(&handle(&notify).unwrap()).unwrap().rcode,
            RCODE_NOTIMP
        );
        // Trailing EDNS OPT record is ignored.
        let mut edns = good.clone();
        edns[11] = 1;
        edns.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_response(&handle(&edns).unwrap()).unwrap().addrs.len(),
            1
        );
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
            let _ = parse_response(&p);
        }
    }
}
