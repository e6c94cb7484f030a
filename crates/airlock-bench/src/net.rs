//! Network benchmarks: the netstack's throughput in one process, and a guest download through
//! it against the same download by the host.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use airlock_net::stack::{GATEWAY, GUEST, GUEST_MAC, MTU, PREFIX};
use airlock_net::{Network, NetworkConfig};
use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec};
use anyhow::{bail, Context, Result};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use tokio::io::AsyncReadExt;

/// Bytes pushed through the netstack per sample.
const STREAM_BYTES: u64 = 256 << 20;

/// A TCP sink on loopback: returns its address and a channel giving (bytes, time from first
/// byte to EOF) per connection.
async fn sink() -> Result<(
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, Duration)>,
)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                let mut t0 = None;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    t0.get_or_insert_with(Instant::now);
                    n += k as u64;
                }
                let _ = tx.send((n, t0.map(|t| t.elapsed()).unwrap_or_default()));
            });
        }
    });
    Ok((addr, rx))
}

/// The "guest" side for the in-process benchmark: a smoltcp client over the framed socket.
struct Framed {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Option<Vec<u8>>,
    tx: UnixStream,
}
struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut UnixStream);
impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len + 4];
        buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
        let r = f(&mut buf[4..]);
        let _ = self.0.write_all(&buf);
        r
    }
}
impl Device for Framed {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: SInstant) -> Option<(Rx, Tx<'_>)> {
        let f = self.pending.take().or_else(|| self.rx.try_recv().ok())?;
        Some((Rx(f), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: SInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU + 14;
        c
    }
}

/// Pushes `bytes` from a smoltcp "guest" through `sock` (the NIC) to `dst`.
fn guest_push(sock: UnixStream, dst: SocketAddr, bytes: u64) -> Result<()> {
    let (ftx, frx) = mpsc::channel();
    let mut rd = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut len = [0u8; 4];
        while rd.read_exact(&mut len).is_ok() {
            let mut f = vec![0; u32::from_be_bytes(len) as usize];
            if rd.read_exact(&mut f).is_err() || ftx.send(f).is_err() {
                return;
            }
        }
    });
    let mut dev = Framed {
        rx: frx,
        pending: None,
        tx: sock,
    };
    let start = Instant::now();
    let now = || SInstant::from_micros(start.elapsed().as_micros() as i64);
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
        &mut dev,
        now(),
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(GUEST), PREFIX));
    });
    iface.routes_mut().add_default_ipv4_route(GATEWAY)?;
    let mut sockets = SocketSet::new(Vec::new());
    let s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 1 << 20]),
        tcp::SocketBuffer::new(vec![0; 1 << 20]),
    );
    let h = sockets.add(s);
    let SocketAddr::V4(v4) = dst else {
        bail!("IPv4 only")
    };
    sockets
        .get_mut::<tcp::Socket>(h)
        .connect(
            iface.context(),
            (IpAddress::Ipv4(*v4.ip()), v4.port()),
            40000,
        )
        .context("connect")?;
    let chunk = vec![0x5a; 64 * 1024];
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        iface.poll(now(), &mut dev, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket>(h);
        while sent < bytes && s.can_send() {
            let n = s.send_slice(&chunk[..chunk.len().min((bytes - sent) as usize)])?;
            if n == 0 {
                break;
            }
            sent += n as u64;
        }
        if sent == bytes && s.send_queue() == 0 && s.is_open() {
            s.close();
        }
        if !s.is_active() && sent == bytes {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("guest push stalled at {sent} of {bytes} bytes");
        }
        // Nothing to send: wait for the next frame (an ACK opening the window) or a timer.
        let d = iface
            .poll_delay(now(), &sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_millis(10))
            .min(Duration::from_millis(10));
        if !d.is_zero() && dev.pending.is_none() {
            if let Ok(f) = dev.rx.recv_timeout(d) {
                dev.pending = Some(f);
            }
        }
    }
}

/// Netstack throughput (frames in → upstream socket) ÷ plain loopback TCP, same bytes.
pub async fn throughput(samples: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (addr, mut done) = sink().await?;
    let mut via_stack = Vec::new();
    let mut loopback = Vec::new();
    for _ in 0..samples {
        // Baseline: the host writing the same bytes straight to the sink.
        let t0 = Instant::now();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut s = std::net::TcpStream::connect(addr)?;
            let chunk = vec![0x5a; 64 * 1024];
            let mut left = STREAM_BYTES;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            Ok(())
        })
        .await??;
        let (n, _) = done.recv().await.context("sink")?;
        loopback.push(gbit(n, t0.elapsed()));

        let net = Network::new(NetworkConfig {
            allow_hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        })?;
        let (host, guest) = UnixStream::pair()?;
        host.set_nonblocking(true)?;
        net.start(host)?;
        let t0 = Instant::now();
        tokio::task::spawn_blocking(move || guest_push(guest, addr, STREAM_BYTES)).await??;
        let (n, _) = done.recv().await.context("sink")?;
        if n != STREAM_BYTES {
            bail!("netstack delivered {n} of {STREAM_BYTES} bytes");
        }
        via_stack.push(gbit(n, t0.elapsed()));
    }
    Ok((via_stack, loopback))
}

fn gbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// A guest download of `mib` MiB from a host server through the netstack (busybox wget)
/// against the host fetching the same with curl: seconds each.
pub async fn download(
    rootfs: &Path,
    mib: u64,
    samples: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let body = mib << 20;
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req).await;
                let hdr = format!("HTTP/1.0 200 OK\r\nContent-Length: {body}\r\n\r\n");
                if s.write_all(hdr.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![0x42u8; 256 * 1024];
                let mut left = body;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    let mut spec = SandboxSpec::new(RootfsSource::from_path(rootfs)?);
    spec.network.allow_hosts = vec!["dl.test".into()];
    spec.network.add_hosts = vec![("dl.test".into(), Ipv4Addr::LOCALHOST.into())];
    let sb = Sandbox::start(spec).await?;
    let url = format!("http://dl.test:{port}/blob");
    let (mut guest, mut host) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let t0 = Instant::now();
        let out = sb
            .output(ExecSpec::new(["wget", "-qO", "/dev/null", &url]))
            .await?;
        let d = t0.elapsed();
        // wget checks the length against Content-Length and fails on a short body.
        if out.status.code != Some(0) {
            bail!(
                "guest download failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        guest.push(d);
        let t0 = Instant::now();
        let st = tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--resolve"])
            .arg(format!("dl.test:{port}:127.0.0.1"))
            .arg(&url)
            .status()
            .await?;
        if !st.success() {
            bail!("host curl failed");
        }
        host.push(t0.elapsed());
    }
    sb.stop().await?;
    Ok((guest, host))
}

fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_d(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// Goal: the netstack moves at least this many Gbit/s on one core.
const THROUGHPUT_GOAL_GBIT: f64 = 2.0;

/// Runs the network benchmarks and returns their markdown section.
pub async fn section(rootfs: &Path) -> Result<String> {
    eprintln!("network: netstack throughput");
    let (stack, lo) = throughput(5).await?;
    eprintln!("network: guest download vs host");
    let (guest, host) = download(rootfs, 64, 5).await?;
    eprintln!("network: MITM vs passthrough HTTPS latency");
    let (mitm, pass) = mitm_latency(15).await?;
    let (s, l) = (median_f(&stack), median_f(&lo));
    let (g, h) = (median_d(&guest), median_d(&host));
    Ok(format!(
        "### Network\n\n\
         | what | median | baseline (same run) | ratio |\n|---|---|---|---|\n\
         | netstack throughput, one process: a smoltcp \"guest\" pushing {mb} MiB through \
         Airlock's stack to a loopback TCP sink (goal ≥ {THROUGHPUT_GOAL_GBIT} Gbit/s) | \
         {s:.2} Gbit/s | {l:.2} Gbit/s host loopback TCP | {r:.2} |\n\
         | guest download of 64 MiB through the netstack (busybox wget, passthrough, TCG) | \
         {gs:.2} s ({gm:.0} MiB/s) | {hs:.3} s host curl | {gr:.1}× |\n\
         | HTTPS request through the MITM (secret substituted; curl in the guest, new \
         connection each) | {mm:.1} ms | {pm:.1} ms passthrough to the same server | {mr:.2} |\n\n",
        mm = mitm * 1e3,
        pm = pass * 1e3,
        mr = mitm / pass,
        mb = STREAM_BYTES >> 20,
        r = s / l,
        gs = g.as_secs_f64(),
        gm = 64.0 / g.as_secs_f64(),
        hs = h.as_secs_f64(),
        gr = g.as_secs_f64() / h.as_secs_f64(),
    ))
}

/// A HTTPS request through the MITM (a host with a secret) against the same request passed
/// through untouched, same server, same sandbox, alternating: medians of curl's total time
/// measured inside the guest (seconds).
pub async fn mitm_latency(samples: usize) -> Result<(f64, f64)> {
    let root = crate::repo_root();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:api.test,DNS:pass.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    let st = std::process::Command::new("sh")
        .arg("-ec")
        .arg(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout server.key -out server.csr -subj /CN=api.test 2>/dev/null
             openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
               -out server.crt -days 2 -extfile ext.cnf 2>/dev/null",
        )
        .current_dir(d)
        .status()?;
    if !st.success() {
        bail!("openssl failed");
    }
    let mut node = tokio::process::Command::new("node")
        .arg(root.join("crates/airlock/tests/net/server.js"))
        .arg(d)
        .kill_on_drop(true)
        .spawn()
        .context("node (the test servers run under Node.js)")?;
    let ready = d.join("ready.json");
    let t0 = Instant::now();
    while !ready.exists() {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("test server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready)?)?;
    let port = ports["https"].as_u64().context("https port")?;
    let script = format!(
        "printf '%s\\n' \"$UPSTREAM_CA\" > /tmp/up.pem
         # Both sides verify against a bundle of the same size (system roots + one CA), so
         # the guest's cost of parsing it is the same and the difference is the proxy's.
         cat /etc/ssl/airlock/bundle.pem /tmp/up.pem > /tmp/pass-bundle.pem
         for i in $(seq {n}); do
           curl -s -o /dev/null -w 'mitm %{{time_total}} %{{http_code}}\\n' --cacert /etc/ssl/airlock/bundle.pem https://api.test:{port}/x -H \"Authorization: Bearer $BENCH_KEY\"
           curl -s -o /dev/null -w 'pass %{{time_total}} %{{http_code}}\\n' --cacert /tmp/pass-bundle.pem https://pass.test:{port}/x
         done",
        n = samples + 1
    );
    let out = tokio::process::Command::new(crate::airlock_bin()?)
        .args(["run", "--image", "demo/debian:bookworm"])
        .args([
            "--add-host",
            "api.test:127.0.0.1",
            "--add-host",
            "pass.test:127.0.0.1",
        ])
        .args(["--allow-host", "api.test", "--allow-host", "pass.test"])
        .args(["--secret", "BENCH_KEY@api.test"])
        .arg("--upstream-ca")
        .arg(d.join("ca.crt"))
        .arg("-e")
        .arg(format!(
            "UPSTREAM_CA={}",
            std::fs::read_to_string(d.join("ca.crt"))?
        ))
        .args(["--", "bash", "-c", &script])
        .env("BENCH_KEY", "bench-secret-value")
        .output()
        .await?;
    let _ = node.kill().await;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut mitm = Vec::new();
    let mut pass = Vec::new();
    // The first pair warms both paths (leaf certificate, upstream TLS) and is not counted.
    for (i, l) in text.lines().enumerate() {
        let f: Vec<&str> = l.split(' ').collect();
        let [k, v, code] = f[..] else { continue };
        let Ok(v) = v.parse::<f64>() else { continue };
        if code != "200" {
            bail!("{k} request answered {code}: {text}");
        }
        if i < 2 {
            continue;
        }
        match k {
            "mitm" => mitm.push(v),
            "pass" => pass.push(v),
            _ => {}
        }
    }
    if mitm.len() < samples || pass.len() < samples || mitm.iter().chain(&pass).any(|v| *v == 0.0) {
        bail!(
            "MITM latency run failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((median_f(&mitm), median_f(&pass)))
}
