//! The guest NIC's far end: ethernet frames from QEMU (a `-netdev stream` socket, each frame
//! behind a 4-byte big-endian length) go through a policy filter into a smoltcp interface that
//! answers ARP, ping to the gateway and DNS, and terminates every allowed TCP connection here.
//! Each terminated connection becomes a byte stream handed to [`crate::proxy::serve`].
//!
//! Threat note: every frame is guest-controlled. Frames are length-checked before anything
//! reads them, parsed with smoltcp's checked wire types, and everything the guest can make
//! this module hold is capped: pending connection decisions, live connections, socket
//! buffers, queued frames, DNS table entries.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, Notify};

use crate::audit::Event;
use crate::dns::Synthetic;
use crate::policy::Verdict;
use crate::proxy::{self, Target};
use crate::Shared;

/// The gateway (Airlock itself): default route and DNS server of the guest.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest's network.
pub const PREFIX: u8 = 24;
/// The gateway's MAC.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x02, 0x02];
/// The guest NIC's MAC.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// IP MTU of the link. Larger frames mean fewer of them, which is what costs under TCG.
pub const MTU: usize = 16384;
/// Largest frame accepted from QEMU (ethernet header + MTU, with slack for VLAN tags).
const MAX_FRAME: usize = MTU + 18;
/// Live plus half-open TCP connections per sandbox.
pub const MAX_CONNS: usize = 256;
/// TCP socket buffer, each direction.
const TCP_BUF: usize = 256 * 1024;
/// Buffer of the in-process pipe between a socket and its proxy task.
const PIPE_BUF: usize = 64 * 1024;
/// How long a listening socket waits for the SYN it was made for.
const ACCEPT_WAIT: Duration = Duration::from_secs(10);
/// How long resolving an allowed name upstream may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards QEMU beyond this many bytes pause new data into the sockets (the
/// guest is not taking frames); ACKs and retransmits still go out.
const TX_SOFT_LIMIT: usize = 4 << 20;
/// Beyond this, frames are dropped (TCP retransmits them): a guest that never drains its NIC
/// cannot make the host hold more.
const TX_HARD_LIMIT: usize = 16 << 20;
/// Distinct dropped-packet kinds reported to the audit log (the rest are counted only).
const MAX_REPORTED: usize = 1024;

/// A frame queue standing in for the device: ingress frames the filter let through, egress
/// frames smoltcp produced.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((Rx(f), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU + 14;
        c
    }
}

/// 4-tuple of a guest TCP connection (guest port, destination).
type Key = (u16, Ipv4Addr, u16);

struct Decision {
    key: Key,
    syn: Vec<u8>,
    result: Result<Target, String>,
    rule: String,
}

struct Awaiting {
    key: Key,
    target: Target,
    since: std::time::Instant,
}

struct Conn {
    pipe: DuplexStream,
    guest_eof_passed: bool,
    proxy_eof: bool,
}

/// Wakes the netstack loop when a proxy task made room or wrote data.
struct NotifyWaker(Arc<Notify>);

impl std::task::Wake for NotifyWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

struct Stack {
    shared: Arc<Shared>,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    pending: HashSet<Key>,
    awaiting: HashMap<SocketHandle, Awaiting>,
    conns: HashMap<SocketHandle, Conn>,
    decisions: mpsc::UnboundedSender<Decision>,
    waker: Waker,
    reported: HashSet<(&'static str, Ipv4Addr, u16)>,
    start: std::time::Instant,
}

/// Runs the netstack for one sandbox until QEMU closes its end of `sock`.
pub(crate) async fn run(sock: tokio::net::UnixStream, shared: Arc<Shared>) {
    let (mut rd, mut wr) = sock.into_split();
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(512);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let counted = shared.clone();
    tokio::spawn(async move {
        let c = &counted.counters;
        let mut len = [0u8; 4];
        loop {
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes(len) as usize;
            // QEMU frames the stream; a length beyond any valid frame means it is corrupt.
            if n > 65_536 {
                tracing::warn!(n, "netdev frame too large; closing the NIC");
                return;
            }
            let mut buf = vec![0; n];
            if rd.read_exact(&mut buf).await.is_err() {
                return;
            }
            crate::Counters::add(&c.tx_bytes, &c.tx_frames, n);
            if !(14..=MAX_FRAME).contains(&n) {
                continue;
            }
            if in_tx.send(buf).await.is_err() {
                return;
            }
        }
    });
    let (q, n) = (queued.clone(), notify.clone());
    let counted = shared.clone();
    tokio::spawn(async move {
        use std::sync::atomic::Ordering;
        let c = &counted.counters;
        let mut buf = Vec::with_capacity(MAX_FRAME + 4);
        while let Some(f) = out_rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
            buf.extend_from_slice(&f);
            if wr.write_all(&buf).await.is_err() {
                return;
            }
            crate::Counters::add(&c.rx_bytes, &c.rx_frames, f.len());
            let before = q.fetch_sub(f.len(), Ordering::AcqRel);
            if before > TX_SOFT_LIMIT && before - f.len() <= TX_SOFT_LIMIT {
                n.notify_one();
            }
        }
    });

    let (dec_tx, mut dec_rx) = mpsc::unbounded_channel();
    let mut st = Stack::new(
        shared,
        dec_tx,
        Waker::from(Arc::new(NotifyWaker(notify.clone()))),
    );
    loop {
        let now = st.now();
        let delay = st
            .iface
            .poll_delay(now, &st.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            f = in_rx.recv() => match f {
                Some(f) => {
                    st.ingress(f);
                    // Take what else is queued before polling: one poll per burst.
                    for _ in 0..64 {
                        match in_rx.try_recv() {
                            Ok(f) => st.ingress(f),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            d = dec_rx.recv() => if let Some(d) = d { st.decided(d) },
            _ = notify.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        st.process(&out_tx, &queued);
    }
    tracing::debug!("netstack: NIC closed");
}

impl Stack {
    fn new(shared: Arc<Shared>, decisions: mpsc::UnboundedSender<Decision>, waker: Waker) -> Stack {
        let mut dev = Queues {
            rx: VecDeque::new(),
            tx: Vec::new(),
        };
        let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        cfg.random_seed = rand_seed();
        let start = std::time::Instant::now();
        let mut iface = Interface::new(cfg, &mut dev, Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY), PREFIX))
                .expect("one address fits");
        });
        // Accept packets for any destination: the gateway terminates them all (after the
        // filter in `ingress` decided which may reach a socket).
        iface.set_any_ip(true);
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY)
            .expect("route table has room");
        let mut sockets = SocketSet::new(Vec::new());
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * 1024]),
        );
        dns.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(GATEWAY)),
            port: 53,
        })
        .expect("fresh socket binds");
        let dns = sockets.add(dns);
        Stack {
            shared,
            iface,
            dev,
            sockets,
            dns,
            pending: HashSet::new(),
            awaiting: HashMap::new(),
            conns: HashMap::new(),
            decisions,
            waker,
            reported: HashSet::new(),
            start,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// The policy filter in front of smoltcp.
    fn ingress(&mut self, frame: Vec<u8>) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => {}
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return;
                };
                if ip.more_frags() || ip.frag_offset() != 0 {
                    return self.drop_report(
                        "ip",
                        Ipv4Addr::UNSPECIFIED,
                        0,
                        "IP fragments are not forwarded",
                    );
                }
                let dst: Ipv4Addr = ip.dst_addr();
                if ip.src_addr() != GUEST {
                    return self.drop_report("ip", ip.src_addr(), 0, "spoofed source address");
                }
                match ip.next_header() {
                    IpProtocol::Tcp => {
                        if dst == GATEWAY {
                            // Nothing listens on the gateway: smoltcp answers with a reset.
                        } else if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                            if tcp.syn() && !tcp.ack() {
                                let key = (tcp.src_port(), dst, tcp.dst_port());
                                if !self.on_syn(key, &frame) {
                                    return;
                                }
                            }
                        }
                    }
                    IpProtocol::Udp => {
                        let port = UdpPacket::new_checked(ip.payload())
                            .map(|u| u.dst_port())
                            .unwrap_or(0);
                        if !(dst == GATEWAY && port == 53) {
                            let why = if port == 53 {
                                "DNS goes only to the sandbox resolver"
                            } else {
                                "UDP other than DNS is not forwarded"
                            };
                            return self.drop_report("udp", dst, port, why);
                        }
                    }
                    IpProtocol::Icmp => {
                        if dst != GATEWAY {
                            return self.drop_report(
                                "icmp",
                                dst,
                                0,
                                "ICMP leaves the sandbox only to the gateway",
                            );
                        }
                    }
                    _ => return self.drop_report("ip", dst, 0, "IP protocol not forwarded"),
                }
            }
            EthernetProtocol::Ipv6 => {
                return self.drop_report("ipv6", Ipv4Addr::UNSPECIFIED, 0, "IPv6 is not forwarded");
            }
            _ => return,
        }
        self.dev.rx.push_back(frame);
    }

    fn drop_report(&mut self, proto: &'static str, dst: Ipv4Addr, port: u16, why: &str) {
        if self.reported.len() < MAX_REPORTED && self.reported.insert((proto, dst, port)) {
            self.shared.audit.record(Event::Connection {
                proto: proto.into(),
                dst: dst.to_string(),
                port,
                host: None,
                upstream: None,
                allowed: false,
                rule: None,
                reason: Some(why.into()),
            });
        }
    }

    /// A new guest connection. Returns whether the SYN goes to smoltcp now (denied: smoltcp
    /// resets it; retransmits of known connections) or is held for an async decision.
    fn on_syn(&mut self, key: Key, frame: &[u8]) -> bool {
        if self.pending.contains(&key) {
            return false;
        }
        let (_, dst, port) = key;
        if self.awaiting.values().any(|a| a.key == key) {
            return true;
        }
        let deny = |this: &mut Stack, host: Option<String>, reason: String| {
            this.shared.audit.record(Event::Connection {
                proto: "tcp".into(),
                dst: dst.to_string(),
                port,
                host,
                upstream: None,
                allowed: false,
                rule: None,
                reason: Some(reason),
            });
            true
        };
        if self.pending.len() + self.awaiting.len() + self.conns.len() >= MAX_CONNS {
            return deny(
                self,
                None,
                format!("more than {MAX_CONNS} connections open"),
            );
        }
        if Synthetic::contains(dst) {
            let name = self
                .shared
                .table
                .lock()
                .unwrap()
                .name(dst)
                .map(str::to_string);
            let Some(name) = name else {
                return deny(
                    self,
                    None,
                    "address not handed out by the sandbox DNS".into(),
                );
            };
            let verdict = self.shared.policy.read().unwrap().check_name(&name, port);
            let rule = match verdict {
                Verdict::Allow(r) => r,
                Verdict::Deny(why) => return deny(self, Some(name), why),
            };
            self.pending.insert(key);
            let shared = self.shared.clone();
            let tx = self.decisions.clone();
            let syn = frame.to_vec();
            tokio::spawn(async move {
                let result = resolve(&shared, &name, port).await.map(|upstream| Target {
                    name: Some(name),
                    port,
                    upstream,
                });
                let _ = tx.send(Decision {
                    key,
                    syn,
                    result,
                    rule,
                });
            });
            false
        } else {
            let verdict = self
                .shared
                .policy
                .read()
                .unwrap()
                .check_ip(IpAddr::V4(dst), port);
            match verdict {
                Verdict::Allow(rule) => {
                    self.pending.insert(key);
                    self.decided(Decision {
                        key,
                        syn: Vec::new(),
                        result: Ok(Target {
                            name: None,
                            port,
                            upstream: SocketAddr::new(IpAddr::V4(dst), port),
                        }),
                        rule,
                    });
                    true
                }
                Verdict::Deny(why) => deny(self, None, why),
            }
        }
    }

    /// Applies a connection decision: a listening socket for an allowed one, then the SYN.
    fn decided(&mut self, d: Decision) {
        self.pending.remove(&d.key);
        let (_, dst, port) = d.key;
        match d.result {
            Ok(target) => {
                self.shared.audit.record(Event::Connection {
                    proto: "tcp".into(),
                    dst: dst.to_string(),
                    port,
                    host: target.name.clone(),
                    upstream: Some(target.upstream.to_string()),
                    allowed: true,
                    rule: Some(d.rule),
                    reason: None,
                });
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; TCP_BUF]),
                    tcp::SocketBuffer::new(vec![0; TCP_BUF]),
                );
                s.set_nagle_enabled(false);
                s.set_ack_delay(None);
                s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
                s.set_timeout(Some(smoltcp::time::Duration::from_secs(300)));
                if s.listen(IpListenEndpoint {
                    addr: Some(IpAddress::Ipv4(dst)),
                    port,
                })
                .is_err()
                {
                    return;
                }
                let h = self.sockets.add(s);
                self.awaiting.insert(
                    h,
                    Awaiting {
                        key: d.key,
                        target,
                        since: std::time::Instant::now(),
                    },
                );
            }
            Err(why) => {
                self.shared.audit.record(Event::Connection {
                    proto: "tcp".into(),
                    dst: dst.to_string(),
                    port,
                    host: None,
                    upstream: None,
                    allowed: false,
                    rule: Some(d.rule),
                    reason: Some(why),
                });
            }
        }
        if !d.syn.is_empty() {
            self.dev.rx.push_back(d.syn);
        }
    }

    fn process(
        &mut self,
        out: &mpsc::UnboundedSender<Vec<u8>>,
        queued: &std::sync::atomic::AtomicUsize,
    ) {
        use std::sync::atomic::Ordering;
        for _ in 0..8 {
            let now = self.now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            for f in self.dev.tx.drain(..) {
                if queued.load(Ordering::Acquire) + f.len() > TX_HARD_LIMIT {
                    continue;
                }
                queued.fetch_add(f.len(), Ordering::AcqRel);
                let _ = out.send(f);
            }
            self.serve_dns();
            self.accept();
            let congested = queued.load(Ordering::Acquire) > TX_SOFT_LIMIT;
            let progress = self.pump(congested);
            if !progress && self.dev.rx.is_empty() {
                break;
            }
        }
    }

    fn serve_dns(&mut self) {
        let sock = self.sockets.get_mut::<udp::Socket>(self.dns);
        while let Ok((q, meta)) = sock.recv() {
            let (reply, events) = {
                let policy = self.shared.policy.read().unwrap();
                let mut table = self.shared.table.lock().unwrap();
                crate::dns::answer(q, &policy, &mut table)
            };
            for e in events {
                self.shared.audit.record(e);
            }
            if let Some(r) = reply {
                let _ = sock.send_slice(&r, meta.endpoint);
            }
        }
    }

    fn accept(&mut self) {
        let mut ready = Vec::new();
        let mut dead = Vec::new();
        for (h, a) in &self.awaiting {
            let s = self.sockets.get::<tcp::Socket>(*h);
            match s.state() {
                tcp::State::Listen | tcp::State::SynReceived => {
                    if s.state() == tcp::State::Listen && a.since.elapsed() > ACCEPT_WAIT {
                        dead.push(*h);
                    }
                }
                tcp::State::Established | tcp::State::CloseWait => ready.push(*h),
                _ => dead.push(*h),
            }
        }
        for h in dead {
            self.awaiting.remove(&h);
            self.sockets.remove(h);
        }
        for h in ready {
            let a = self.awaiting.remove(&h).expect("listed above");
            let (ours, theirs) = tokio::io::duplex(PIPE_BUF);
            let ctx = self.shared.proxy.clone();
            tokio::spawn(proxy::serve(theirs, a.target, ctx));
            self.conns.insert(
                h,
                Conn {
                    pipe: ours,
                    guest_eof_passed: false,
                    proxy_eof: false,
                },
            );
        }
    }

    /// Moves bytes between sockets and proxy pipes. Returns whether anything moved.
    fn pump(&mut self, congested: bool) -> bool {
        let mut cx = Context::from_waker(&self.waker);
        let mut progress = false;
        let mut gone = Vec::new();
        for (h, c) in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            // Guest → proxy.
            while s.can_recv() {
                let r = s.recv(|buf| match Pin::new(&mut c.pipe).poll_write(&mut cx, buf) {
                    Poll::Ready(Ok(n)) => (n, Ok(n)),
                    Poll::Ready(Err(e)) => (0, Err(e)),
                    Poll::Pending => (0, Ok(0)),
                });
                match r {
                    Ok(Ok(0)) => break,
                    Ok(Ok(_)) => progress = true,
                    Ok(Err(_)) | Err(_) => {
                        // The proxy is gone: reset the guest's connection.
                        s.abort();
                        break;
                    }
                }
            }
            if !s.may_recv() && !s.can_recv() && !c.guest_eof_passed {
                match Pin::new(&mut c.pipe).poll_shutdown(&mut cx) {
                    Poll::Ready(_) => {
                        c.guest_eof_passed = true;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            // Proxy → guest.
            while !congested && !c.proxy_eof && s.can_send() {
                let r = s.send(|buf| {
                    let mut rb = ReadBuf::new(buf);
                    match Pin::new(&mut c.pipe).poll_read(&mut cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            (n, if n == 0 { Some(true) } else { Some(false) })
                        }
                        Poll::Ready(Err(_)) => (0, Some(true)),
                        Poll::Pending => (0, None),
                    }
                });
                match r {
                    Ok(Some(false)) => progress = true,
                    Ok(Some(true)) => {
                        c.proxy_eof = true;
                        s.close();
                        progress = true;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            if !s.may_send() && !c.proxy_eof && !s.is_active() {
                c.proxy_eof = true;
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                gone.push(*h);
            }
        }
        for h in gone {
            self.conns.remove(&h);
            self.sockets.remove(h);
            progress = true;
        }
        progress
    }
}

/// Resolves an allowed name on the host and picks the first address the policy accepts.
async fn resolve(shared: &Shared, name: &str, port: u16) -> Result<SocketAddr, String> {
    let pinned = shared.policy.read().unwrap().pinned(name);
    if let Some(ip) = pinned {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| format!("resolving {name} timed out"))?
        .map_err(|e| format!("cannot resolve {name}: {e}"))?;
    let mut last = format!("{name} has no address");
    for a in addrs {
        match shared.policy.read().unwrap().check_resolved(name, a.ip()) {
            Ok(()) => return Ok(a),
            Err(why) => last = why,
        }
    }
    Err(last)
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a valid buffer; a short read only weakens ISN randomness.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    u64::from_le_bytes(b)
}

/// Feeds guest frames through the filter and the stack with a fixed policy, as the fuzz
/// target does. Not an API.
#[doc(hidden)]
pub fn fuzz_frames(frames: &[&[u8]]) {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    });
    rt.block_on(async {
        let net = crate::Network::new(crate::NetworkConfig {
            allow_hosts: vec!["a.test".into(), "203.0.113.1".into()],
            ..Default::default()
        })
        .expect("valid config");
        // Hand out an address so SYNs to it take the decision path.
        net.shared.table.lock().unwrap().address("a.test");
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut st = Stack::new(net.shared.clone(), tx, Waker::noop().clone());
        let (out, mut sink) = mpsc::unbounded_channel();
        let queued = std::sync::atomic::AtomicUsize::new(0);
        for f in frames {
            st.ingress(f.to_vec());
            st.process(&out, &queued);
            while sink.try_recv().is_ok() {}
        }
    });
}
