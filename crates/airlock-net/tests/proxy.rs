//! The connection proxy against real servers and real clients: HTTPS servers (hyper, HTTP/1.1
//! and HTTP/2) with their own test CA on 127.0.0.1, a WebSocket echo, a server that resets
//! mid-response, a plain-HTTP server and a TCP echo; curl, node and a tungstenite client go
//! through a listener whose sockets are handed to `proxy::serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_net::proxy::{self, ProxyContext, Secret, Target};
use airlock_net::{Audit, HostPattern};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "tok-REAL-9f8e7d6c5b4a";
const TOKEN_PH: &str = "PH_TOKEN_abcdef123";
const OTHER: &str = "oth-REAL-1122334455";
const OTHER_PH: &str = "PH_OTHER_abcdef123";
const BODYSECRET: &str = "bod-REAL-5566778899";
const BODY_PH: &str = "PH_BODY_abcdef123";

/// A CA for the "real" upstream servers, unrelated to the sandbox CA.
struct ServerCa {
    issuer: Issuer<'static, KeyPair>,
    pem_path: PathBuf,
}

impl ServerCa {
    fn new(dir: &Path) -> ServerCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "upstream test CA");
        let cert = p.self_signed(&key).unwrap();
        let pem_path = dir.join("upstream-ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        ServerCa {
            issuer: Issuer::new(p, key),
            pem_path,
        }
    }

    fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    }
}

/// What an upstream server saw.
#[derive(Default)]
struct Seen {
    /// Every decrypted byte received, across connections.
    raw: Vec<u8>,
    /// (version, method, uri, headers, body) per request.
    requests: Vec<(http::Version, String, String, http::HeaderMap, Bytes)>,
    connections: usize,
}

type Shared = Arc<Mutex<Seen>>;

/// Records the bytes read from a stream.
struct Tap<S> {
    inner: S,
    seen: Shared,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.seen.lock().unwrap().raw.extend_from_slice(&new);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, seen: Shared) {
    type B = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            // Echoes the URL (as many servers' error pages do) and the Authorization header.
            let reply = format!(
                "hello from upstream, {} {} {}\n",
                parts.method,
                parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
                body.len()
            );
            let auth = parts.headers.get("authorization").cloned();
            let split = parts.uri.path() == "/split";
            seen.lock().unwrap().requests.push((
                parts.version,
                parts.method.to_string(),
                parts.uri.to_string(),
                parts.headers,
                body,
            ));
            let b: B = if split {
                // The value split across two chunks sent 50 ms apart.
                let (a, z) = TOKEN.split_at(7);
                let chunks = vec![format!("start {a}"), format!("{z} end\n")];
                let s = futures_util::stream::unfold(chunks.into_iter(), |mut it| async move {
                    let c = it.next()?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(c))),
                        it,
                    ))
                });
                BodyExt::boxed(http_body_util::StreamBody::new(s))
            } else {
                Full::new(Bytes::from(reply)).boxed()
            };
            let mut res = http::Response::new(b);
            if let Some(a) = auth {
                res.headers_mut().insert("x-seen-auth", a);
            }
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// An HTTPS server (h2 and http/1.1 unless `alpn` says otherwise) recording what it receives.
async fn https_server(ca: &ServerCa, names: &[&str], alpn: &[&[u8]]) -> (SocketAddr, Shared) {
    let cfg = ca.server_config(names, alpn);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Shared = Default::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            s2.lock().unwrap().connections += 1;
            let acc = tokio_rustls::TlsAcceptor::from(cfg.clone());
            let seen = s2.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acc.accept(sock).await {
                    serve_http(
                        Tap {
                            inner: tls,
                            seen: seen.clone(),
                        },
                        seen,
                    )
                    .await;
                }
            });
        }
    });
    (addr, seen)
}

/// A plain-HTTP server recording what it receives.
async fn http_server() -> (SocketAddr, Shared) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Shared = Default::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            s2.lock().unwrap().connections += 1;
            let seen = s2.clone();
            tokio::spawn(serve_http(
                Tap {
                    inner: sock,
                    seen: seen.clone(),
                },
                seen,
            ));
        }
    });
    (addr, seen)
}

/// A WebSocket echo over TLS (http/1.1 only, as WebSocket servers usually are).
async fn ws_server(ca: &ServerCa, name: &str) -> SocketAddr {
    let cfg = ca.server_config(&[name], &[b"http/1.1"]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let acc = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                let Ok(tls) = acc.accept(sock).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    addr
}

/// An HTTPS server that promises a large body, sends part of it, then resets the connection.
async fn resetting_server(ca: &ServerCa, name: &str) -> SocketAddr {
    let cfg = ca.server_config(&[name], &[b"http/1.1"]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let acc = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acc.accept(sock).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                    .await;
                let _ = tls.write_all(&[b'x'; 5000]).await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (sock, _) = tls.into_inner();
                #[allow(deprecated)] // zero linger = RST, which is the point here
                let _ = sock.set_linger(Some(Duration::ZERO));
                drop(sock);
            });
        }
    });
    addr
}

/// A TCP echo server.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A listener standing in for the netstack: each accepted socket goes to `proxy::serve`.
async fn proxy_listener(
    ctx: Arc<ProxyContext>,
    name: Option<&str>,
    port: u16,
    up: SocketAddr,
) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = l.local_addr().unwrap().port();
    let name = name.map(str::to_string);
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let target = Target {
                name: name.clone(),
                port,
                upstream: up,
            };
            tokio::spawn(proxy::serve(sock, target, ctx.clone()));
        }
    });
    p
}

struct Env {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    ca: ServerCa,
    ctx: Arc<ProxyContext>,
    sandbox_ca: PathBuf,
    audit_file: PathBuf,
}

fn secret(name: &str, value: &str, host: &str, ph: &str, in_body: bool) -> Secret {
    Secret {
        name: name.into(),
        value: value.into(),
        hosts: vec![host.parse::<HostPattern>().unwrap()],
        placeholder: Some(ph.into()),
        in_body,
        allow_http: false,
    }
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let ca = ServerCa::new(&d);
    let audit_file = d.join("audit.jsonl");
    let audit = Audit::new(Some(&audit_file)).unwrap();
    let ctx = ProxyContext::new(
        vec![
            secret("TOKEN", TOKEN, "api.test", TOKEN_PH, false),
            secret("OTHER", OTHER, "other.test", OTHER_PH, false),
            secret("BODYKEY", BODYSECRET, "*.body.test", BODY_PH, true),
            Secret {
                allow_http: true,
                ..secret("PLAINKEY", TOKEN, "plain.test", "PH_PLAIN_abcdef123", false)
            },
        ],
        std::slice::from_ref(&ca.pem_path),
        audit,
    )
    .unwrap();
    let sandbox_ca = d.join("sandbox-ca.pem");
    std::fs::write(&sandbox_ca, ctx.ca_pem()).unwrap();
    Env {
        _dir: dir,
        dir: d,
        ca,
        ctx: Arc::new(ctx),
        sandbox_ca,
        audit_file,
    }
}

impl Env {
    fn audit(&self) -> String {
        std::fs::read_to_string(&self.audit_file).unwrap_or_default()
    }
    fn events(&self) -> Vec<serde_json::Value> {
        self.audit()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    fn assert_no_secret_in_audit(&self) {
        let a = self.audit();
        for v in [TOKEN, OTHER, BODYSECRET] {
            assert!(!a.contains(v), "secret value in the audit log: {a}");
        }
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn curl(args: &[&str]) -> Out {
    let o = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

fn resolve(name: &str, port: u16) -> String {
    format!("{name}:{port}:127.0.0.1")
}

fn header<'a>(h: &'a http::HeaderMap, n: &str) -> &'a str {
    h.get(n).map(|v| v.to_str().unwrap()).unwrap_or("")
}

#[tokio::test]
async fn substitutes_secret_for_bound_host_http1() {
    let e = env();
    let (up, seen) = https_server(&e.ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    let url = format!("https://api.test:{port}/v1/{TOKEN_PH}/items?key={TOKEN_PH}&x=1");
    let out = curl(&[
        "-v",
        "--http1.1",
        "--cacert",
        e.sandbox_ca.to_str().unwrap(),
        "--resolve",
        &resolve("api.test", port),
        "-H",
        &format!("Authorization: Bearer {TOKEN_PH}"),
        "-H",
        &format!("Cookie: a=1; t={TOKEN_PH}"),
        &url,
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("hello from upstream, GET"),
        "{}",
        out.stdout
    );
    // The server echoed the URL in its body: the values there are masked, same length.
    assert!(
        out.stdout.contains(&format!(
            "/v1/{}/items?key={}&x=1",
            "*".repeat(TOKEN.len()),
            "*".repeat(TOKEN.len())
        )),
        "{}",
        out.stdout
    );
    // A value split across two response chunks is masked too.
    let split = curl(&[
        "--cacert",
        e.sandbox_ca.to_str().unwrap(),
        "--resolve",
        &resolve("api.test", port),
        &format!("https://api.test:{port}/split?k={TOKEN_PH}"),
    ])
    .await;
    assert_eq!(
        split.stdout,
        format!("start {} end\n", "*".repeat(TOKEN.len()))
    );
    // The server echoed the value in a header; the guest sees the placeholder.
    assert!(
        out.stderr
            .contains(&format!("x-seen-auth: Bearer {TOKEN_PH}")),
        "{}",
        out.stderr
    );
    for s in [&out.stdout, &out.stderr] {
        assert!(!s.contains(TOKEN), "value reached the client: {s}");
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.requests.len(), 2);
        let (version, method, uri, h, _) = &seen.requests[0];
        assert_eq!(method, "GET");
        // curl spoke HTTP/1.1; the upstream offered h2, so the proxy translated.
        assert_eq!(*version, http::Version::HTTP_2);
        assert_eq!(header(h, "authorization"), format!("Bearer {TOKEN}"));
        assert_eq!(header(h, "cookie"), format!("a=1; t={TOKEN}"));
        assert!(
            uri.contains(&format!("/v1/{TOKEN}/items?key={TOKEN}&x=1")),
            "{uri}"
        );
        assert!(!String::from_utf8_lossy(&seen.raw).contains(TOKEN_PH));
    }
    let ev = e.events();
    let subs: Vec<_> = ev.iter().filter(|v| v["type"] == "substitution").collect();
    assert!(subs
        .iter()
        .any(|v| v["location"] == "header" && v["secret"] == "TOKEN"));
    assert!(subs
        .iter()
        .any(|v| v["location"] == "url" && v["host"] == "api.test"));
    let http: Vec<_> = ev.iter().filter(|v| v["type"] == "http").collect();
    assert_eq!(http.len(), 2, "{ev:?}");
    assert_eq!(http[0]["status"], 200);
    assert_eq!(
        http[0]["path"],
        format!("/v1/{TOKEN_PH}/items?key={TOKEN_PH}&x=1")
    );
    assert_eq!(
        http[0]["bytes"].as_u64().unwrap() as usize,
        out.stdout.len()
    );
    assert!(ev.iter().any(|v| v["type"] == "tls" && v["mode"] == "mitm"));
    e.assert_no_secret_in_audit();
}

#[tokio::test]
async fn http2_guest_to_http1_and_http2_upstreams() {
    let e = env();
    let (up2, seen2) = https_server(&e.ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let (up1, seen1) = https_server(&e.ca, &["api.test"], &[b"http/1.1"]).await;
    for (up, seen, want) in [
        (up2, seen2, http::Version::HTTP_2),
        (up1, seen1, http::Version::HTTP_11),
    ] {
        let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
        let out = curl(&[
            "--http2",
            "-w",
            "\n%{http_version}",
            "--cacert",
            e.sandbox_ca.to_str().unwrap(),
            "--resolve",
            &resolve("api.test", port),
            "-H",
            &format!("X-Api-Key: {TOKEN_PH}"),
            "-d",
            "some body",
            &format!("https://api.test:{port}/post"),
        ])
        .await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout.ends_with("\n2"),
            "guest did not get HTTP/2: {}",
            out.stdout
        );
        assert!(out.stdout.starts_with("hello from upstream, POST /post 9"));
        let seen = seen.lock().unwrap();
        let (version, method, _, h, body) = &seen.requests[0];
        assert_eq!(*version, want);
        assert_eq!(method, "POST");
        assert_eq!(header(h, "x-api-key"), TOKEN);
        assert_eq!(&body[..], b"some body");
    }
    e.assert_no_secret_in_audit();
}

#[tokio::test]
async fn node_https_client_through_mitm() {
    let e = env();
    let (up, seen) = https_server(&e.ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    let script = format!(
        r#"const https = require('https'); const fs = require('fs');
const req = https.request({{host: '127.0.0.1', port: {port}, servername: 'api.test', path: '/node?k={TOKEN_PH}',
  headers: {{Host: 'api.test', Authorization: 'token {TOKEN_PH}'}}, ca: fs.readFileSync('{ca}')}}, res => {{
  let b = ''; res.on('data', d => b += d); res.on('end', () => {{ console.log(res.statusCode + ' ' + b); }});
}});
req.on('error', e => {{ console.error(e.message); process.exit(2); }}); req.end();"#,
        ca = e.sandbox_ca.display()
    );
    let o = tokio::process::Command::new("node")
        .args(["-e", &script])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.starts_with("200 hello from upstream, GET"),
        "{stdout}"
    );
    assert!(!stdout.contains(TOKEN));
    let seen = seen.lock().unwrap();
    assert_eq!(
        header(&seen.requests[0].3, "authorization"),
        format!("token {TOKEN}")
    );
    assert!(seen.requests[0].2.ends_with(&format!("/node?k={TOKEN}")));
}

#[tokio::test]
async fn placeholder_of_another_hosts_secret_is_refused() {
    let e = env();
    let (up, canary) = https_server(&e.ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    for (hdr, url) in [
        (
            format!("Authorization: Bearer {OTHER_PH}"),
            "/x".to_string(),
        ),
        ("X-A: b".to_string(), format!("/x?k={OTHER_PH}")),
        // Even mixed with a placeholder that is bound here.
        (format!("X-A: {TOKEN_PH} {OTHER_PH}"), "/x".to_string()),
    ] {
        let out = curl(&[
            "-w",
            "\n%{http_code}",
            "--cacert",
            e.sandbox_ca.to_str().unwrap(),
            "--resolve",
            &resolve("api.test", port),
            "-H",
            &hdr,
            &format!("https://api.test:{port}{url}"),
        ])
        .await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
        assert!(out.stdout.contains("secret OTHER"), "{}", out.stdout);
        assert!(!out.stdout.contains(OTHER) && !out.stdout.contains(TOKEN));
    }
    let c = canary.lock().unwrap();
    assert_eq!(c.connections, 0, "the canary was contacted");
    assert!(c.raw.is_empty());
    let ev = e.events();
    let refused: Vec<_> = ev
        .iter()
        .filter(|v| v["type"] == "http" && v["status"] == 403)
        .collect();
    assert_eq!(refused.len(), 3, "{ev:?}");
    assert!(refused[0]["reason"].as_str().unwrap().contains("OTHER"));
    assert!(!ev.iter().any(|v| v["type"] == "substitution"));
    e.assert_no_secret_in_audit();
}

#[tokio::test]
async fn host_header_not_matching_sni_is_refused() {
    let e = env();
    let (up, canary) = https_server(&e.ca, &["api.test"], &[b"h2", b"http/1.1"]).await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    for v in ["--http1.1", "--http2"] {
        let out = curl(&[
            v,
            "-w",
            "\n%{http_code}",
            "--cacert",
            e.sandbox_ca.to_str().unwrap(),
            "--resolve",
            &resolve("api.test", port),
            "-H",
            "Host: other.test",
            "-H",
            &format!("Authorization: Bearer {TOKEN_PH}"),
            &format!("https://api.test:{port}/"),
        ])
        .await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
        assert!(out.stdout.contains("domain fronting"), "{}", out.stdout);
    }
    assert_eq!(canary.lock().unwrap().connections, 0);
    assert!(e.audit().contains("domain fronting"));
}

#[tokio::test]
async fn sni_not_matching_the_name_is_blocked() {
    let e = env();
    let (up, canary) = https_server(&e.ca, &["api.test", "pass.test"], &[b"http/1.1"]).await;
    // The address was handed out for pass.test (not intercepted); the guest asks for api.test.
    let port = proxy_listener(e.ctx.clone(), Some("pass.test"), 443, up).await;
    let out = curl(&[
        "--cacert",
        e.ca.pem_path.to_str().unwrap(),
        "--resolve",
        &resolve("api.test", port),
        &format!("https://api.test:{port}/"),
    ])
    .await;
    assert_ne!(out.code, 0, "{}", out.stdout);
    // No SNI at all (a raw-IP URL) to a named target is blocked too.
    let out = curl(&["-k", &format!("https://127.0.0.1:{port}/")]).await;
    assert_ne!(out.code, 0);
    assert_eq!(canary.lock().unwrap().connections, 0);
    let ev = e.events();
    let blocked: Vec<_> = ev
        .iter()
        .filter(|v| v["type"] == "tls" && v["mode"] == "blocked")
        .collect();
    assert_eq!(blocked.len(), 2, "{ev:?}");
    assert_eq!(blocked[0]["sni"], "api.test");
    assert!(blocked[1]["reason"]
        .as_str()
        .unwrap()
        .contains("no server name"));
}

#[tokio::test]
async fn passthrough_keeps_the_servers_certificate() {
    let e = env();
    let (up, seen) = https_server(&e.ca, &["pass.test"], &[b"h2", b"http/1.1"]).await;
    let port = proxy_listener(e.ctx.clone(), Some("pass.test"), 443, up).await;
    let url = format!("https://pass.test:{port}/p?k={OTHER_PH}");
    let ok = curl(&[
        "--cacert",
        e.ca.pem_path.to_str().unwrap(),
        "--resolve",
        &resolve("pass.test", port),
        &url,
    ])
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.starts_with("hello from upstream, GET"));
    let bad = curl(&[
        "--cacert",
        e.sandbox_ca.to_str().unwrap(),
        "--resolve",
        &resolve("pass.test", port),
        &url,
    ])
    .await;
    assert_eq!(bad.code, 60, "expected a certificate error: {}", bad.stderr);
    // Untouched: the placeholder reached the server as is (it is not this host's secret, and
    // passthrough never sees plaintext).
    assert!(seen.lock().unwrap().requests[0].2.contains(OTHER_PH));
    assert!(e
        .events()
        .iter()
        .any(|v| v["type"] == "tls" && v["mode"] == "passthrough" && v["sni"] == "pass.test"));
}

#[tokio::test]
async fn websocket_through_mitm() {
    let e = env();
    let up = ws_server(&e.ca, "api.test").await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    let mut roots = rustls::RootCertStore::empty();
    let pem = e.ctx.ca_pem();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("api.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://api.test/socket?token={TOKEN_PH}");
    let (mut ws, res) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(res.status(), 101);
    for i in 0..3 {
        let msg = format!("ping {i} {}", "z".repeat(i * 10000));
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
    let ev = e.events();
    assert!(
        ev.iter().any(|v| v["type"] == "http" && v["status"] == 101),
        "{ev:?}"
    );
    assert!(ev
        .iter()
        .any(|v| v["type"] == "substitution" && v["location"] == "url"));
}

#[tokio::test]
async fn upstream_reset_mid_response_ends_the_guest_request() {
    let e = env();
    let up = resetting_server(&e.ca, "api.test").await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    for v in ["--http1.1", "--http2"] {
        let out = curl(&[
            v,
            "-o",
            "/dev/null",
            "--cacert",
            e.sandbox_ca.to_str().unwrap(),
            "--resolve",
            &resolve("api.test", port),
            &format!("https://api.test:{port}/big"),
        ])
        .await;
        // An error, not success and not curl's own timeout (28).
        assert!(
            out.code != 0 && out.code != 28,
            "{v}: code {} {}",
            out.code,
            out.stderr
        );
    }
    let ev = e.events();
    assert!(
        ev.iter().any(|v| v["type"] == "http"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("upstream response failed"))),
        "{ev:?}"
    );
}

#[tokio::test]
async fn upstream_down_gives_502() {
    let e = env();
    // A port nothing listens on.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, dead).await;
    let out = curl(&[
        "-w",
        "\n%{http_code}",
        "--cacert",
        e.sandbox_ca.to_str().unwrap(),
        "--resolve",
        &resolve("api.test", port),
        &format!("https://api.test:{port}/"),
    ])
    .await;
    assert!(
        out.stdout.ends_with("\n502"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("unreachable"));
}

#[tokio::test]
async fn plain_http_substitution_and_body() {
    let e = env();
    let (up, seen) = http_server().await;
    let port = proxy_listener(e.ctx.clone(), Some("plain.test"), 80, up).await;
    let out = curl(&[
        "--resolve",
        &resolve("plain.test", port),
        "-H",
        "X-Key: PH_PLAIN_abcdef123",
        &format!("http://plain.test:{port}/q?k=PH_PLAIN_abcdef123"),
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("hello from upstream"));
    {
        let s = seen.lock().unwrap();
        assert_eq!(header(&s.requests[0].3, "x-key"), TOKEN);
        assert!(s.requests[0].2.ends_with(&format!("/q?k={TOKEN}")));
    }
    // A secret without allow_http, to its own host but over plain HTTP: refused before
    // anything reaches the server, with the flag to use named.
    let (up1, canary1) = http_server().await;
    let port1 = proxy_listener(e.ctx.clone(), Some("api.test"), 80, up1).await;
    let out = curl(&[
        "-w",
        "\n%{http_code}",
        "--resolve",
        &resolve("api.test", port1),
        "-H",
        &format!("Authorization: Bearer {TOKEN_PH}"),
        &format!("http://api.test:{port1}/"),
    ])
    .await;
    assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
    assert!(
        out.stdout.contains("--secret-allow-http TOKEN"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains(TOKEN), "{}", out.stdout);
    assert!(canary1.lock().unwrap().requests.is_empty());

    // A placeholder to a raw-IP destination (no name: nothing bound) is refused.
    let (up2, canary) = http_server().await;
    let port2 = proxy_listener(e.ctx.clone(), None, 80, up2).await;
    let out = curl(&[
        "-w",
        "\n%{http_code}",
        "-H",
        &format!("X-Key: {TOKEN_PH}"),
        &format!("http://127.0.0.1:{port2}/"),
    ])
    .await;
    assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
    assert_eq!(canary.lock().unwrap().connections, 0);

    // in_body secrets: substituted in a bounded body, over TLS.
    let (up3, seen3) = https_server(&e.ca, &["x.body.test"], &[b"h2", b"http/1.1"]).await;
    let port3 = proxy_listener(e.ctx.clone(), Some("x.body.test"), 443, up3).await;
    let out = curl(&[
        "--cacert",
        e.sandbox_ca.to_str().unwrap(),
        "--resolve",
        &resolve("x.body.test", port3),
        "-d",
        &format!("{{\"key\":\"{BODY_PH}\"}}"),
        &format!("https://x.body.test:{port3}/b"),
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        &seen3.lock().unwrap().requests[0].4[..],
        format!("{{\"key\":\"{BODYSECRET}\"}}").as_bytes()
    );
    assert!(e
        .events()
        .iter()
        .any(|v| v["type"] == "substitution" && v["location"] == "body"));
    e.assert_no_secret_in_audit();
}

#[tokio::test]
async fn non_tls_non_http_is_spliced() {
    let e = env();
    let up = echo_server().await;
    let port = proxy_listener(e.ctx.clone(), Some("git.test"), 22, up).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut msg = b"SSH-2.0-OpenSSH_9.2\r\n".to_vec();
    msg.extend((0..200_000u32).map(|i| (i % 251) as u8));
    let (mut r, mut w) = s.split();
    let writer = async {
        w.write_all(&msg).await.unwrap();
        // Half-close: the echo server sees EOF, finishes, and closes its side.
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let reader = r.read_to_end(&mut back);
    let (_, n) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await
    .unwrap();
    n.unwrap();
    assert_eq!(back, msg);
    let _ = &e.dir;
}

#[tokio::test]
async fn malformed_or_oversized_client_hello_is_blocked() {
    let e = env();
    let (up, canary) = https_server(&e.ca, &["api.test"], &[b"http/1.1"]).await;
    let port = proxy_listener(e.ctx.clone(), Some("api.test"), 443, up).await;
    // A handshake record that is not a ClientHello; then one that never ends (a record
    // header announcing 16 KiB, followed by endless bytes).
    let mut endless = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
    endless.extend(std::iter::repeat_n(0x41u8, 64 * 1024));
    for bytes in [b"\x16\x03\x01\x00\x05hello".to_vec(), endless] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let mut rest = Vec::new();
        // The proxy ends the connection (an alert or nothing), without waiting for a timeout.
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("proxy closed the connection")
            .ok();
    }
    assert_eq!(canary.lock().unwrap().connections, 0);
    let ev = e.events();
    let blocked = ev
        .iter()
        .filter(|v| v["type"] == "tls" && v["mode"] == "blocked")
        .count();
    assert_eq!(blocked, 2, "{ev:?}");
}
