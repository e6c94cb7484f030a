//! Port forwards against real guests: busybox servers inside, real TCP clients (tokio, curl)
//! outside, bytes checked by SHA-256. Needs the kernel, agent and demo rootfs from
//! `scripts/setup`; fails loudly without them.

use std::sync::Arc;
use std::time::Duration;

use airlock_sandbox::{ConnectErrorKind, Error, Exec, ExecSpec, GuestStream, Sandbox};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{sh, spec};

fn hex_sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Runs futures concurrently, results in order.
async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Starts a long-running server in the guest; the returned exec keeps it alive.
async fn serve(sb: &Sandbox, script: &str) -> Exec {
    sb.exec(ExecSpec::new(["sh", "-c", script])).await.unwrap()
}

/// Connects once the guest server listens (it starts asynchronously).
async fn connect_when_up(sb: &Sandbox, port: u16) -> GuestStream {
    // Generous: under TCG on a loaded host a server can take seconds to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match sb.connect(port).await {
            Ok(s) => return s,
            Err(Error::Connect { error, .. }) if error.kind == ConnectErrorKind::Refused => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("connect {port}: {e}"),
        }
    }
    panic!("nothing listens on guest port {port}");
}

/// nc runs this per connection: reads the upload to EOF, answers its hash, then sends a file.
const UPLOAD_THEN_DOWNLOAD: &str =
    "#!/bin/sh\ncat > /tmp/up.$$\nsha256sum < /tmp/up.$$\nrm /tmp/up.$$\ncat /tmp/down\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_stream_moves_megabytes_both_ways_with_half_close() {
    let sb = Sandbox::start(spec()).await.expect("sandbox start");
    let down_sha = sh(
        &sb,
        &format!(
            "head -c 6000000 /dev/urandom > /tmp/down && printf '{UPLOAD_THEN_DOWNLOAD}' > /srv.sh && chmod +x /srv.sh && sha256sum < /tmp/down"
        ),
    )
    .await;
    let _server = serve(&sb, "exec nc -ll -p 7000 -e /srv.sh").await;
    let mut s = connect_when_up(&sb, 7000).await;

    let up = noise(5_000_000, 7);
    // Write the whole upload while reading concurrently, as a real client would.
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        wr.write_all(&up).await.unwrap();
        wr.shutdown().await.unwrap(); // half-close: the server's cat sees EOF
        (wr, hex_sha(&up))
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    let (wr, up_sha) = writer.await.unwrap();
    s = rd.unsplit(wr);
    drop(s);

    let line_end = got.iter().position(|b| *b == b'\n').expect("hash line");
    let answer = String::from_utf8_lossy(&got[..line_end]).to_string();
    assert_eq!(
        answer.split_whitespace().next(),
        Some(up_sha.as_str()),
        "guest saw different upload bytes"
    );
    let download = &got[line_end + 1..];
    assert_eq!(download.len(), 6_000_000);
    assert_eq!(
        Some(hex_sha(download).as_str()),
        down_sha.split_whitespace().next(),
        "download corrupted"
    );
    // The agent still runs commands after the forward (exec handling undisturbed).
    assert_eq!(sh(&sb, "echo still-here").await, "still-here\n");
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_parallel_connections_keep_their_bytes_apart() {
    let sb = Arc::new(Sandbox::start(spec()).await.expect("sandbox start"));
    sh(
        &sb,
        &format!(
            "head -c 300000 /dev/urandom > /tmp/down && printf '{UPLOAD_THEN_DOWNLOAD}' > /srv.sh && chmod +x /srv.sh"
        ),
    )
    .await;
    let down_sha = sh(&sb, "sha256sum < /tmp/down").await;
    let down_sha = down_sha.split_whitespace().next().unwrap().to_string();
    let _server = serve(&sb, "exec nc -ll -p 7001 -e /srv.sh").await;
    drop(connect_when_up(&sb, 7001).await);

    let mut tasks = Vec::new();
    for i in 0..25u64 {
        let sb = sb.clone();
        tasks.push(tokio::spawn(async move {
            let up = noise(200_000 + i as usize * 1000, i + 100);
            // busybox nc's backlog is tiny: in a burst of 25 under TCG on a busy host, a SYN
            // may be dropped until the kernel's retries give up. Like a client, try again; what
            // is tested is that the bytes of the connections that exist stay apart.
            let mut attempt = 0;
            let s = loop {
                match sb.connect(7001).await {
                    Ok(s) => break s,
                    Err(e) if attempt < 3 => {
                        eprintln!("connection {i}: {e}; retrying");
                        attempt += 1;
                    }
                    Err(e) => panic!("connection {i}: {e}"),
                }
            };
            let (mut rd, mut wr) = tokio::io::split(s);
            let want = hex_sha(&up);
            let w = tokio::spawn(async move {
                wr.write_all(&up).await.unwrap();
                wr.shutdown().await.unwrap();
                wr
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            drop(w.await.unwrap());
            (want, got)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (want, got) = t.await.unwrap();
        let nl = got.iter().position(|b| *b == b'\n').unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got[..nl])
                .split_whitespace()
                .next(),
            Some(want.as_str()),
            "connection {i}: upload mixed up"
        );
        assert_eq!(
            hex_sha(&got[nl + 1..]),
            down_sha,
            "connection {i}: download"
        );
    }
    assert_eq!(sh(&sb, "echo ok").await, "ok\n");
    Arc::try_unwrap(sb).unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_port_serves_curl_refuses_cleanly_and_stops_on_drop() {
    let sb = Sandbox::start(spec()).await.expect("sandbox start");
    let sha = sh(
        &sb,
        "mkdir -p /www && head -c 4000000 /dev/urandom > /www/big && sha256sum < /www/big",
    )
    .await;
    let _httpd = serve(&sb, "exec httpd -f -p 80 -h /www").await;
    drop(connect_when_up(&sb, 80).await);

    let fwd = sb
        .forward_port("127.0.0.1:0".parse().unwrap(), 80)
        .await
        .unwrap();
    let addr = fwd.local_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(fwd.guest_port(), 80);
    let url = format!("http://{addr}/big");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60", &url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        Some(hex_sha(&out.stdout).as_str()),
        sha.split_whitespace().next()
    );

    // Twenty curls at once through the one listener.
    let mid = sh(
        &sb,
        "head -c 500000 /dev/urandom > /www/mid && sha256sum < /www/mid",
    )
    .await;
    let mid_url = format!("http://{addr}/mid");
    let curls: Vec<_> = (0..20)
        .map(|_| {
            tokio::process::Command::new("curl")
                .args(["-sS", "--fail", "--max-time", "120", &mid_url])
                .output()
        })
        .collect();
    for (i, out) in futures_join(curls).await.into_iter().enumerate() {
        let out = out.unwrap();
        assert!(
            out.status.success(),
            "curl {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            Some(hex_sha(&out.stdout).as_str()),
            mid.split_whitespace().next(),
            "curl {i}"
        );
    }

    // Nothing listens on 81: the client's connection is accepted, then closed cleanly
    // (end of file, no hang), and the forward keeps serving.
    let refused = sb
        .forward_port("127.0.0.1:0".parse().unwrap(), 81)
        .await
        .unwrap();
    let mut c = tokio::net::TcpStream::connect(refused.local_addr())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf))
        .await
        .expect("refused connection must be closed, not left hanging")
        .unwrap();
    assert_eq!(n, 0);
    match sb.connect(81).await {
        Err(e @ Error::Connect { .. }) => {
            assert!(
                e.to_string().contains("is a server listening on port 81"),
                "{e}"
            )
        }
        other => panic!("connect to a closed port: {other:?}"),
    }
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");

    // Dropping the forward stops listening.
    drop(fwd);
    common::wait_until(
        "the dropped forward stops listening",
        Duration::from_secs(30),
        || async { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;

    // Stopping the sandbox stops the other one too.
    let addr2 = refused.local_addr();
    sb.stop().await.unwrap();
    common::wait_until(
        "the stopped sandbox's forward stops listening",
        Duration::from_secs(30),
        || async { tokio::net::TcpStream::connect(addr2).await.is_err() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_abort_resets_the_guest_side_and_guest_close_ends_the_host_read() {
    let sb = Sandbox::start(spec()).await.expect("sandbox start");
    // The server's stdin is a FIFO that never ends, so only the connection can end nc.
    let mut log = serve(
        &sb,
        "mkfifo /tmp/f; exec 3<>/tmp/f; nc -l -p 7002 <&3 > /tmp/got; echo nc-exit=$? > /tmp/status; exec sleep 1000",
    )
    .await;
    let mut s = connect_when_up(&sb, 7002).await;
    s.write_all(b"partial").await.unwrap();
    let mut got = String::new();
    for _ in 0..100 {
        got = sh(&sb, "cat /tmp/got").await;
        if got == "partial" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, "partial");
    drop(s); // without shutdown: an abort
    let mut status = String::new();
    for _ in 0..100 {
        status = sh(&sb, "cat /tmp/status 2>/dev/null; true").await;
        if !status.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        status.starts_with("nc-exit="),
        "guest nc never saw the abort"
    );
    log.input().signal(9, true).await.unwrap();
    while let Ok(Some(_)) = log.next().await {}

    // A server that closes first: the host reads its bytes, then end of file.
    sh(
        &sb,
        "printf '#!/bin/sh\necho bye\n' > /bye.sh && chmod +x /bye.sh",
    )
    .await;
    let _srv = serve(&sb, "exec nc -ll -p 7003 -e /bye.sh").await;
    let mut s = connect_when_up(&sb, 7003).await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .expect("guest close must end the host read")
        .unwrap();
    assert_eq!(got, b"bye\n");
    drop(s);
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_a_stream_nobody_reads_stalls_in_the_guest() {
    let sb = Sandbox::start(spec()).await.expect("sandbox start");
    sh(
        &sb,
        "printf '#!/bin/sh\\nexec cat /dev/zero\\n' > /flood.sh && chmod +x /flood.sh",
    )
    .await;
    let _srv = serve(&sb, "exec nc -ll -p 7004 -e /flood.sh").await;
    let mut s = connect_when_up(&sb, 7004).await;
    // Nobody reads for a while: the host holds at most one window.
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    // (The one byte read may hold back its credit, so "full" is at least half here.)
    common::wait_until(
        "the guest filled the window",
        Duration::from_secs(120),
        || {
            let n = s.buffered_bytes();
            async move { n >= airlock_proto::INITIAL_WINDOW / 2 }
        },
    )
    .await;
    let held = s.buffered_bytes();
    assert!(
        held <= airlock_proto::INITIAL_WINDOW,
        "host buffered {held} bytes"
    );
    // Reading resumes the flow: 20 MB arrive intact (all zeros).
    let mut buf = vec![1u8; 20_000_000];
    s.read_exact(&mut buf).await.unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert!(s.buffered_bytes() <= airlock_proto::INITIAL_WINDOW);
    drop(s);
    assert_eq!(sh(&sb, "echo alive").await, "alive\n");
    sb.stop().await.unwrap();
}
