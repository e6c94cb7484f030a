//! Port-forward benchmark: the same HTTP downloads through `Sandbox::forward_port` from busybox
//! httpd in the guest, and from busybox httpd on the host (the baseline), alternating.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec};
use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{ms, pct};

/// Size of the large download, bytes.
pub const BIG: usize = 64 * 1024 * 1024;
/// Small downloads (one 100-byte file each: connect + request + answer) per kind.
const SMALL_RUNS: usize = 50;

/// Results: big-download times and small-request round trips, forwarded and host-local.
pub struct Ports {
    pub fwd_big: Vec<Duration>,
    pub host_big: Vec<Duration>,
    pub fwd_small: Vec<Duration>,
    pub host_small: Vec<Duration>,
}

/// One HTTP/1.0 GET over a fresh connection; returns the body length.
async fn get(addr: SocketAddr, path: &str) -> Result<usize> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut body = 0usize;
    let mut in_body = false;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if in_body {
            body += n;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.0 200") && !head.starts_with(b"HTTP/1.1 200") {
                bail!("GET {path}: {}", String::from_utf8_lossy(&head[..i]));
            }
            body = head.len() - i - 4;
            in_body = true;
        }
    }
    Ok(body)
}

async fn timed_get(addr: SocketAddr, path: &str, want: usize) -> Result<Duration> {
    let t = Instant::now();
    let got = get(addr, path).await?;
    let d = t.elapsed();
    if got != want {
        bail!("GET {path} from {addr}: {got} bytes, expected {want}");
    }
    Ok(d)
}

/// Waits until something answers HTTP at `addr`.
async fn wait_http(addr: SocketAddr) -> Result<()> {
    for _ in 0..300 {
        if get(addr, "/small").await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no HTTP server answered at {addr}")
}

pub async fn bench(iterations: usize, rootfs: &Path) -> Result<Ports> {
    // Host baseline server: the same busybox httpd, files of the same sizes.
    let www = tempfile::tempdir()?;
    std::fs::write(www.path().join("big"), vec![0x5a; BIG])?;
    std::fs::write(www.path().join("small"), [b'x'; 100])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut httpd = tokio::process::Command::new("busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(www.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start busybox httpd on the host (apt-get install busybox-static)")?;
    let host: SocketAddr = ([127, 0, 0, 1], port).into();

    let sb = Sandbox::start(SandboxSpec::new(RootfsSource::from_path(rootfs)?)).await?;
    let r = async {
        let out = sb
            .output(ExecSpec::new([
                "sh",
                "-c",
                &format!(
                    "mkdir -p /www && head -c {BIG} /dev/zero > /www/big && head -c 100 /dev/zero > /www/small"
                ),
            ]))
            .await?;
        if out.status.code != Some(0) {
            bail!("guest setup: {}", String::from_utf8_lossy(&out.stderr));
        }
        let _server = sb
            .exec(ExecSpec::new(["httpd", "-f", "-p", "80", "-h", "/www"]))
            .await?;
        let fwd_l = sb.forward_port("127.0.0.1:0".parse()?, 80).await?;
        let fwd = fwd_l.local_addr();
        wait_http(fwd).await?;
        wait_http(host).await?;
        // Uncounted warm-up of both paths (TCG translates the guest's code on first use).
        timed_get(fwd, "/big", BIG).await?;
        timed_get(host, "/big", BIG).await?;
        let mut p = Ports {
            fwd_big: Vec::new(),
            host_big: Vec::new(),
            fwd_small: Vec::new(),
            host_small: Vec::new(),
        };
        for _ in 0..iterations {
            p.fwd_big.push(timed_get(fwd, "/big", BIG).await?);
            p.host_big.push(timed_get(host, "/big", BIG).await?);
        }
        for _ in 0..SMALL_RUNS {
            p.fwd_small.push(timed_get(fwd, "/small", 100).await?);
            p.host_small.push(timed_get(host, "/small", 100).await?);
        }
        Ok(p)
    }
    .await;
    sb.stop().await?;
    let _ = httpd.kill().await;
    r
}

fn mbps(d: Duration) -> f64 {
    BIG as f64 / 1e6 / d.as_secs_f64()
}

/// The port-forward table.
pub fn table(iterations: usize, p: &Ports) -> String {
    let (fb, hb) = (pct(&p.fwd_big, 0.5), pct(&p.host_big, 0.5));
    let (fs, hs) = (pct(&p.fwd_small, 0.5), pct(&p.host_small, 0.5));
    format!(
        "\n### Port forward\n\n\
         HTTP downloads from busybox httpd through `forward_port` (guest → control channel → \
         host listener) against the same server on the host, same client; {iterations} \
         downloads of {} MiB and {SMALL_RUNS} of a 100-byte file each, alternating:\n\n\
         | | 64 MiB median | throughput | 100 B request p50 | p90 |\n|---|---:|---:|---:|---:|\n\
         | through the port forward | {:.0} ms | {:.0} MB/s | {:.2} ms | {:.2} ms |\n\
         | host-local httpd | {:.0} ms | {:.0} MB/s | {:.2} ms | {:.2} ms |\n\n\
         Ratio forward / host-local: throughput **{:.3}**, small-request latency **{:.1}** \
         (no goal set; under TCG the guest's CPU is the limit)\n",
        BIG / (1024 * 1024),
        ms(fb),
        mbps(fb),
        ms(fs),
        ms(pct(&p.fwd_small, 0.9)),
        ms(hb),
        mbps(hb),
        ms(hs),
        ms(pct(&p.host_small, 0.9)),
        mbps(fb) / mbps(hb),
        fs.as_secs_f64() / hs.as_secs_f64(),
    )
}
