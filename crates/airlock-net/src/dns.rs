//! Airlock's DNS server for the guest. Nothing here ever queries a real resolver: allowed
//! names get a synthetic address from [`SYNTHETIC_NET`] that the netstack maps back to the
//! name when the guest connects; every other name gets NXDOMAIN. So a guest cannot tunnel data
//! out through DNS, and it never learns a real upstream address.
//!
//! Threat note: every query is guest-controlled bytes. Parsing is hickory-proto's, bounded by
//! [`MAX_QUERY`]; a query that does not parse gets no answer (or FORMERR when its id is
//! readable), never a panic.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use crate::audit::Event;
use crate::policy::{normalize_name, Policy};

/// Where synthetic addresses come from (inside the benchmarking range, never routed).
pub const SYNTHETIC_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 16);
/// Largest query accepted.
pub const MAX_QUERY: usize = 4096;
/// How many names keep a synthetic address at once; the oldest is recycled beyond that.
pub const MAX_NAMES: usize = 60_000;
/// TTL of the answers: short, so a recycled address is not cached for long.
const TTL: u32 = 30;

/// The name ↔ synthetic address table.
#[derive(Debug, Default)]
pub struct Synthetic {
    by_name: HashMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
    order: VecDeque<Ipv4Addr>,
    next: u32,
}

impl Synthetic {
    /// The address for `name`, allocating one if needed.
    pub fn address(&mut self, name: &str) -> Ipv4Addr {
        if let Some(ip) = self.by_name.get(name) {
            return *ip;
        }
        let ip = if self.order.len() >= MAX_NAMES {
            let ip = self.order.pop_front().expect("table is full");
            if let Some(old) = self.by_ip.remove(&ip) {
                self.by_name.remove(&old);
            }
            ip
        } else {
            // .0.0 and .255.255 are skipped: some stacks treat them specially.
            self.next += 1;
            Ipv4Addr::from(u32::from(SYNTHETIC_NET.0) + self.next)
        };
        self.by_name.insert(name.to_string(), ip);
        self.by_ip.insert(ip, name.to_string());
        self.order.push_back(ip);
        ip
    }

    /// The name behind a synthetic address.
    pub fn name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    /// Whether `ip` is in the synthetic range.
    pub fn contains(ip: Ipv4Addr) -> bool {
        u32::from(ip) >> (32 - SYNTHETIC_NET.1)
            == u32::from(SYNTHETIC_NET.0) >> (32 - SYNTHETIC_NET.1)
    }
}

/// Answers one query. Returns the reply bytes (None: nothing to send) and the audit events.
pub fn answer(
    query: &[u8],
    policy: &Policy,
    table: &mut Synthetic,
) -> (Option<Vec<u8>>, Vec<Event>) {
    let mut events = Vec::new();
    if query.len() > MAX_QUERY || query.len() < 12 {
        return (None, events);
    }
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            let id = u16::from_be_bytes([query[0], query[1]]);
            return (
                Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok(),
                events,
            );
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return (None, events);
    }
    let id = msg.metadata.id;
    if msg.metadata.op_code != OpCode::Query || msg.queries.len() != 1 {
        let code = if msg.metadata.op_code != OpCode::Query {
            ResponseCode::NotImp
        } else {
            ResponseCode::FormErr
        };
        return (
            Message::error_msg(id, msg.metadata.op_code, code)
                .to_vec()
                .ok(),
            events,
        );
    }
    let q = &msg.queries[0];
    let qtype = q.query_type();
    let raw = q.name().to_ascii();
    let name = normalize_name(&raw);
    let allowed = name.as_deref().is_some_and(|n| policy.name_allowed(n));
    let mut reply = Message::response(id, OpCode::Query);
    reply.metadata.recursion_desired = msg.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    let mut given = None;
    if allowed {
        let name = name.clone().expect("allowed implies a name");
        if qtype == RecordType::A {
            let ip = table.address(&name);
            given = Some(ip.to_string());
            reply.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
        }
        // Other types of an allowed name: an empty NOERROR, so clients fall back to A (no
        // IPv6 leaves the sandbox; TXT and friends could carry data).
    } else {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    events.push(Event::Dns {
        name: name.unwrap_or_else(|| truncate(&raw, 255)),
        qtype: qtype.to_string(),
        answer: given,
        allowed,
    });
    (reply.to_vec().ok(), events)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn pol(rules: &[&str]) -> Policy {
        Policy::new(
            &rules.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &[],
            &[],
        )
        .unwrap()
    }

    #[test]
    fn allowed_names_get_synthetic_addresses() {
        let p = pol(&["api.example.com", "*.github.com"]);
        let mut t = Synthetic::default();
        let (r, ev) = answer(&query("API.example.com.", RecordType::A), &p, &mut t);
        let r = Message::from_vec(&r.unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        let RData::A(A(ip)) = r.answers[0].data() else {
            panic!("not an A record")
        };
        assert!(Synthetic::contains(*ip));
        assert_eq!(t.name(*ip), Some("api.example.com"));
        assert!(matches!(&ev[0], Event::Dns { allowed: true, .. }));
        // Stable per name.
        let (r2, _) = answer(&query("api.example.com", RecordType::A), &p, &mut t);
        let r2 = Message::from_vec(&r2.unwrap()).unwrap();
        assert_eq!(r2.answers[0].data(), r.answers[0].data());
        // AAAA and TXT of allowed names: empty success.
        for ty in [RecordType::AAAA, RecordType::TXT, RecordType::MX] {
            let (r, _) = answer(&query("x.github.com", ty), &p, &mut t);
            let r = Message::from_vec(&r.unwrap()).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.answers.is_empty());
        }
    }

    #[test]
    fn others_get_nxdomain() {
        let p = pol(&["api.example.com"]);
        let mut t = Synthetic::default();
        for n in [
            "example.com",
            "evil.com",
            "aGVsbG8gd29ybGQ.tunnel.evil.com",
            "api.example.com.evil.com",
        ] {
            let (r, ev) = answer(&query(n, RecordType::A), &p, &mut t);
            let r = Message::from_vec(&r.unwrap()).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{n}");
            assert!(r.answers.is_empty());
            assert!(matches!(&ev[0], Event::Dns { allowed: false, .. }));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let p = pol(&["*"]);
        let mut t = Synthetic::default();
        assert!(answer(&[], &p, &mut t).0.is_none());
        assert!(answer(&[0; 11], &p, &mut t).0.is_none());
        let (r, _) = answer(&[0xab, 0xcd, 1, 0, 0, 5, 0, 0, 0, 0, 0, 0, 1], &p, &mut t);
        let r = Message::from_vec(&r.unwrap()).unwrap();
        assert_eq!(r.metadata.id, 0xabcd);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert!(answer(&vec![0u8; MAX_QUERY + 1], &p, &mut t).0.is_none());
    }

    #[test]
    fn table_is_bounded() {
        let mut t = Synthetic::default();
        let first = t.address("n0.test");
        for i in 1..MAX_NAMES + 10 {
            t.address(&format!("n{i}.test"));
        }
        assert!(t.by_name.len() <= MAX_NAMES);
        assert!(t.name(first).is_some_and(|n| n != "n0.test"));
        assert!(t.by_ip.keys().all(|ip| Synthetic::contains(*ip)));
    }
}
