//! What happens to one allowed TCP connection once the netstack accepted it.
//!
//! The first bytes decide: a TLS ClientHello has its SNI checked against the name behind the
//! address, then is either passed through untouched or — when a secret is bound to the name —
//! terminated with a leaf from the per-sandbox CA so each HTTP request can be checked and its
//! placeholders replaced before it is re-encrypted to the real server. Plain HTTP gets the same
//! request treatment; anything else is spliced through.
//!
//! **Threat notes.** Both ends are untrusted: the guest writes every byte of the ClientHello,
//! the request heads and bodies, and the upstream server answers with bytes a guest may have
//! chosen (it picked the allowed host). Bounds: at most [`MAX_PEEK`] bytes are buffered before
//! the TLS/HTTP decision, a started ClientHello must finish within 10 s, upstream connects and
//! handshakes within 10 s, HTTP/1 heads are capped at 64 KiB and must arrive within 60 s,
//! HTTP/2 has at most 100 concurrent streams and 64 KiB of headers, and only bodies up to
//! [`MAX_SUBST_BODY`] are buffered for substitution (larger ones stream untouched). The SNI,
//! the Host / `:authority` and the connection's name must agree before a placeholder is
//! replaced, so a guest cannot steer a secret to another host by naming it in a header; a
//! placeholder bound elsewhere gets a 403. Secret values exist only in this process's memory
//! and are masked in what the server echoes back. Head parsing is `rewrite.rs` (fuzzed by
//! `fuzz/fuzz_targets/http_rewrite.rs`); HTTP framing is hyper's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client_h1, http2 as client_h2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::audit::{Audit, Event};
use crate::ca::Ca;
use crate::policy::normalize_name;
use crate::rewrite::{request_host, rewrite_head, strip_hop_by_hop, Refused};
use crate::secrets::{Location, Secrets};

pub use crate::secrets::Secret;

/// A proxy setup error (bad secret, unreadable CA file, ...). Never carries a secret value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ProxyError(pub String);

/// Most bytes of a ClientHello (or of a first HTTP request line) buffered before deciding.
pub const MAX_PEEK: usize = 16 * 1024;
/// Time for the guest to complete its ClientHello once it started one.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which a connection counts as server-speaks-first (SMTP, MySQL...) and is
/// spliced through.
const SILENCE: Duration = Duration::from_secs(3);
/// Connect (and upstream TLS handshake) timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body buffered for `in_body` substitution; larger ones stream untouched.
pub const MAX_SUBST_BODY: u64 = 1024 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Shared by all connections of one sandbox.
pub struct ProxyContext {
    secrets: Secrets,
    ca: Ca,
    upstream: Upstream,
    audit: Audit,
}

/// The upstream TLS client configurations (the host's roots plus `--upstream-ca`), made on
/// the first upstream TLS connection: reading and parsing the host's roots takes milliseconds
/// that a start would otherwise wait for, and many sandboxes never dial TLS. The netstack's
/// thread, where that connection runs, may read the system's roots under its confinement;
/// roots named by `SSL_CERT_FILE` or `SSL_CERT_DIR` may lie elsewhere, so with those set they
/// are read at once.
struct Upstream {
    /// The `--upstream-ca` roots, parsed (and refused if bad) at start.
    extra: rustls::RootCertStore,
    ready: std::sync::OnceLock<Result<Clients, String>>,
}

#[derive(Clone)]
struct Clients {
    /// ALPN h2 and http/1.1.
    any: Arc<ClientConfig>,
    /// ALPN http/1.1 only (an upgrade must stay on HTTP/1.1).
    h1: Arc<ClientConfig>,
}

impl Clients {
    fn make(extra: &rustls::RootCertStore) -> Result<Clients, String> {
        let mut roots = extra.clone();
        for c in rustls_native_certs::load_native_certs().certs {
            // A host root rustls cannot parse is skipped, as browsers do.
            let _ = roots.add(c);
        }
        let roots = Arc::new(roots);
        let client = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, String> {
            let mut c = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client configuration: {e}"))?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Clients {
            any: client(&[b"h2", b"http/1.1"])?,
            h1: client(&[b"http/1.1"])?,
        })
    }
}

impl Upstream {
    fn load(extra: rustls::RootCertStore) -> Upstream {
        let up = Upstream {
            extra,
            ready: std::sync::OnceLock::new(),
        };
        if ["SSL_CERT_FILE", "SSL_CERT_DIR"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            let _ = up.ready.set(Clients::make(&up.extra));
        }
        up
    }

    fn get(&self) -> Result<Clients, String> {
        self.ready
            .get_or_init(|| Clients::make(&self.extra))
            .clone()
    }
}

impl std::fmt::Debug for ProxyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyContext")
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

impl ProxyContext {
    /// `secrets`: (name, value, host patterns, placeholder, in_body); `extra_roots`: PEM files
    /// trusted for upstream TLS besides the host's roots.
    pub fn new(
        secrets: Vec<Secret>,
        extra_roots: &[PathBuf],
        audit: Audit,
    ) -> Result<ProxyContext, ProxyError> {
        let secrets = Secrets::new(secrets)?;
        let ca = Ca::generate()?;
        // The extra roots are read now, so a bad file is refused at start.
        let mut extra = rustls::RootCertStore::empty();
        for p in extra_roots {
            use rustls::pki_types::pem::PemObject;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    ProxyError(format!(
                        "cannot read upstream CA file {}: {e} (give a PEM file of certificates)",
                        p.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(ProxyError(format!(
                    "upstream CA file {} holds no PEM certificate",
                    p.display()
                )));
            }
            for c in certs {
                extra
                    .add(c)
                    .map_err(|e| ProxyError(format!("upstream CA file {}: {e}", p.display())))?;
            }
        }
        Ok(ProxyContext {
            secrets,
            ca,
            upstream: Upstream::load(extra),
            audit,
        })
    }

    /// PEM of the per-sandbox CA certificate (the guest trusts it).
    pub fn ca_pem(&self) -> String {
        self.ca.pem().to_string()
    }

    /// The placeholder of each secret, for the guest's environment: (name, placeholder).
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.secrets.placeholders()
    }

    /// Whether connections to `name` get TLS-terminated (a secret is bound to it).
    pub fn intercepts(&self, name: &str) -> bool {
        normalize_name(name).is_some_and(|n| self.secrets.bound_to(&n))
    }
}

/// Where the guest was going.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name behind the synthetic address Airlock's DNS gave out (None: a raw-IP destination).
    pub name: Option<String>,
    /// Port the guest connected to.
    pub port: u16,
    /// The upstream address Airlock resolved and checked; dial exactly this (no re-resolving).
    pub upstream: SocketAddr,
}

/// Serves one guest connection to completion (never panics; errors end the connection and
/// become audit events).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    guest: S,
    target: Target,
    ctx: Arc<ProxyContext>,
) {
    let target = Target {
        name: target.name.as_deref().and_then(normalize_name),
        ..target
    };
    // A panic here would only end this task, but say so in the audit log rather than vanish.
    let t2 = target.clone();
    let ctx2 = ctx.clone();
    let res = tokio::spawn(serve_inner(guest, target, ctx)).await;
    if let Err(e) = res {
        if e.is_panic() {
            ctx2.audit
                .record(connection_event(&t2, "internal error in the proxy"));
        }
    }
}

fn connection_event(t: &Target, reason: impl Into<String>) -> Event {
    Event::Connection {
        proto: "tcp".into(),
        dst: t.upstream.ip().to_string(),
        port: t.port,
        host: t.name.clone(),
        upstream: Some(t.upstream.to_string()),
        allowed: true,
        rule: None,
        reason: Some(reason.into()),
    }
}

fn tls_event(t: &Target, sni: Option<&str>, mode: &str, reason: Option<String>) -> Event {
    Event::Tls {
        host: t.name.clone(),
        sni: sni.map(str::to_string),
        mode: mode.into(),
        reason,
    }
}

async fn serve_inner<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut guest: S,
    target: Target,
    ctx: Arc<ProxyContext>,
) {
    let intercepted = target
        .name
        .as_deref()
        .is_some_and(|n| ctx.secrets.bound_to(n));
    let mut buf = Vec::with_capacity(4096);
    // Port 443 and intercepted names never fall back to a blind splice on silence: that would
    // skip the SNI check for a ClientHello sent late.
    let patient = intercepted || target.port == 443;
    let wait = if patient { HELLO_TIMEOUT } else { SILENCE };
    match timeout(wait, read_some(&mut guest, &mut buf)).await {
        // The guest half-closed before saying anything: a server-speaks-first exchange
        // (`nc host port </dev/null`) still gets its answer, unless TLS was expected.
        Ok(Ok(0)) if !patient => return passthrough(guest, buf, &target, &ctx).await,
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(_)) => {}
        Err(_) if patient => {
            ctx.audit.record(connection_event(
                &target,
                "closed: the guest sent nothing within 10 s",
            ));
            return;
        }
        Err(_) => return passthrough(guest, buf, &target, &ctx).await,
    }
    if buf[0] == 0x16 {
        return tls(guest, buf, target, ctx, intercepted).await;
    }
    if intercepted || (!ctx.secrets.is_empty() && looks_like_http1(&buf)) {
        let conn = Arc::new(Conn::new(ctx, target, false, Version::HTTP_11));
        let io = TokioIo::new(Prefixed::new(buf, guest));
        let svc = hyper::service::service_fn({
            let conn = conn.clone();
            move |req| handle(req, conn.clone())
        });
        let _ = client_h1_server()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
        return;
    }
    passthrough(guest, buf, &target, &ctx).await
}

fn client_h1_server() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60))
        .max_buf_size(64 * 1024);
    b
}

/// Reads more bytes from the guest into `buf` (up to [`MAX_PEEK`]).
async fn read_some<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let room = MAX_PEEK - buf.len();
    if room == 0 {
        return Ok(0);
    }
    let mut chunk = vec![0u8; room.min(8192)];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// `METHOD SP` at the start, METHOD an uppercase token: enough to tell HTTP/1 from other
/// protocols' first bytes.
fn looks_like_http1(b: &[u8]) -> bool {
    let n = b
        .iter()
        .take(16)
        .take_while(|c| c.is_ascii_uppercase())
        .count();
    n >= 3 && b.get(n) == Some(&b' ')
}

async fn dial(target: &Target) -> Result<TcpStream, String> {
    match timeout(CONNECT_TIMEOUT, TcpStream::connect(target.upstream)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("upstream {} unreachable: {e}", target.upstream)),
        Err(_) => Err(format!(
            "upstream {} did not answer within {} s",
            target.upstream,
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Splices guest and upstream, replaying what was already read. Half-closes propagate.
async fn passthrough<S: AsyncRead + AsyncWrite + Unpin>(
    mut guest: S,
    buf: Vec<u8>,
    target: &Target,
    ctx: &ProxyContext,
) {
    let mut up = match dial(target).await {
        Ok(s) => s,
        Err(e) => {
            ctx.audit.record(connection_event(target, e));
            return;
        }
    };
    if up.write_all(&buf).await.is_err() {
        return;
    }
    drop(buf);
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut up).await;
}

async fn tls<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut guest: S,
    mut buf: Vec<u8>,
    target: Target,
    ctx: Arc<ProxyContext>,
    intercepted: bool,
) {
    // rustls parses the ClientHello; we keep our own copy of the bytes to replay them.
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let sni = loop {
        while fed < buf.len() {
            let mut rd = &buf[fed..];
            match acceptor.read_tls(&mut rd) {
                Ok(0) | Err(_) => break,
                Ok(n) => fed += n,
            }
        }
        match acceptor.accept() {
            Ok(Some(acc)) => break acc.client_hello().server_name().map(str::to_string),
            Ok(None) => {}
            Err((e, _)) => {
                ctx.audit.record(tls_event(
                    &target,
                    None,
                    "blocked",
                    Some(format!("not a valid TLS ClientHello: {e}")),
                ));
                return;
            }
        }
        if buf.len() >= MAX_PEEK {
            ctx.audit.record(tls_event(
                &target,
                None,
                "blocked",
                Some(format!("ClientHello larger than {MAX_PEEK} bytes")),
            ));
            return;
        }
        match tokio::time::timeout_at(deadline, read_some(&mut guest, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return,
            Err(_) => {
                ctx.audit.record(tls_event(
                    &target,
                    None,
                    "blocked",
                    Some("incomplete ClientHello after 10 s".into()),
                ));
                return;
            }
        }
    };
    let sni_norm = sni.as_deref().and_then(normalize_name);
    if let Some(name) = &target.name {
        let reason = match &sni_norm {
            None if sni.is_some() => Some("malformed server name".to_string()),
            None => Some(format!("no server name (SNI) in a connection to {name}")),
            Some(s) if s != name => Some(format!(
                "server name {s} does not match {name}, the name this address was given for"
            )),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            ctx.audit
                .record(tls_event(&target, sni.as_deref(), "blocked", Some(reason)));
            return;
        }
    }
    if !intercepted {
        ctx.audit
            .record(tls_event(&target, sni.as_deref(), "passthrough", None));
        return passthrough(guest, buf, &target, &ctx).await;
    }
    // Intercepted implies a name, and the SNI equals it.
    let name = target.name.clone().unwrap_or_default();
    let cfg = match ctx.ca.server_config(&name) {
        Ok(c) => c,
        Err(e) => {
            ctx.audit
                .record(tls_event(&target, sni.as_deref(), "blocked", Some(e.0)));
            return;
        }
    };
    ctx.audit
        .record(tls_event(&target, sni.as_deref(), "mitm", None));
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let stream = match timeout(HELLO_TIMEOUT, acceptor.accept(Prefixed::new(buf, guest))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.audit.record(tls_event(
                &target,
                sni.as_deref(),
                "blocked",
                Some(format!("TLS handshake with the guest failed: {e}")),
            ));
            return;
        }
        Err(_) => return,
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let version = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let conn = Arc::new(Conn::new(ctx, target, true, version));
    let io = TokioIo::new(stream);
    let svc = hyper::service::service_fn({
        let conn = conn.clone();
        move |req| handle(req, conn.clone())
    });
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size(64 * 1024);
        let _ = b.serve_connection(io, svc).await;
    } else {
        let _ = client_h1_server()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
    }
}

/// Replays buffered bytes before reading from the stream.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Upstream senders of one guest connection.
#[derive(Default)]
struct Pool {
    h2: Option<client_h2::SendRequest<ProxyBody>>,
    h1_idle: Vec<client_h1::SendRequest<ProxyBody>>,
}

/// Most idle HTTP/1 upstream connections kept per guest connection.
const MAX_IDLE_H1: usize = 4;

enum Sender {
    H1(client_h1::SendRequest<ProxyBody>),
    H2(client_h2::SendRequest<ProxyBody>),
}

/// State of one guest connection served as HTTP.
struct Conn {
    ctx: Arc<ProxyContext>,
    target: Target,
    tls: bool,
    guest_version: Version,
    pool: Mutex<Pool>,
}

impl Conn {
    fn new(ctx: Arc<ProxyContext>, target: Target, tls: bool, guest_version: Version) -> Self {
        Conn {
            ctx,
            target,
            tls,
            guest_version,
            pool: Mutex::new(Pool::default()),
        }
    }

    /// Host name (or address) used in audit events.
    fn host(&self) -> String {
        self.target
            .name
            .clone()
            .unwrap_or_else(|| self.target.upstream.ip().to_string())
    }

    /// Authority for upstream requests: the name, with the port unless it is the default.
    fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let h = self.host();
        let h = if self.target.name.is_none() && self.target.upstream.is_ipv6() {
            format!("[{h}]")
        } else {
            h
        };
        if self.target.port == default {
            h
        } else {
            format!("{h}:{}", self.target.port)
        }
    }

    async fn sender(&self, upgrade: bool) -> Result<Sender, String> {
        if !upgrade {
            let mut pool = self.pool.lock().unwrap();
            if let Some(h2) = &pool.h2 {
                if !h2.is_closed() {
                    return Ok(Sender::H2(h2.clone()));
                }
                pool.h2 = None;
            }
            pool.h1_idle.retain(|s| !s.is_closed());
            if let Some(i) = pool.h1_idle.iter().position(|s| s.is_ready()) {
                return Ok(Sender::H1(pool.h1_idle.swap_remove(i)));
            }
        }
        let tcp = dial(&self.target).await?;
        if !self.tls {
            return self.handshake_h1(TokioIo::new(tcp), upgrade).await;
        }
        let clients = self.ctx.upstream.get()?;
        let cfg = if upgrade { clients.h1 } else { clients.any };
        let name = self.target.name.clone().unwrap_or_default();
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| format!("'{name}' is not a valid TLS server name"))?;
        let tls = match timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg).connect(server_name, tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("TLS to {name} failed: {e}")),
            Err(_) => return Err(format!("TLS handshake with {name} timed out")),
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let mut b = client_h2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            let (send, conn) = b
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 handshake with {name} failed: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.pool.lock().unwrap().h2 = Some(send.clone());
            return Ok(Sender::H2(send));
        }
        self.handshake_h1(TokioIo::new(tls), upgrade).await
    }

    async fn handshake_h1<T>(&self, io: TokioIo<T>, upgrade: bool) -> Result<Sender, String>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut send, conn) = client_h1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/1 handshake with {} failed: {e}", self.host()))?;
        if upgrade {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        send.ready()
            .await
            .map_err(|e| format!("upstream {} closed: {e}", self.host()))?;
        Ok(Sender::H1(send))
    }

    fn give_back(&self, s: client_h1::SendRequest<ProxyBody>) {
        let mut pool = self.pool.lock().unwrap();
        if pool.h1_idle.len() < MAX_IDLE_H1 {
            pool.h1_idle.push(s);
        }
    }
}

/// What goes into the audit event of one request.
struct Req {
    method: String,
    host: String,
    path: String,
}

impl Req {
    fn event(&self, status: u16, bytes: u64, reason: Option<String>) -> Event {
        Event::Http {
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            status,
            bytes,
            reason,
        }
    }
}

fn refuse(conn: &Conn, info: &Req, status: StatusCode, reason: String) -> Response<ProxyBody> {
    tracing::info!(host = %info.host, status = status.as_u16(), %reason, "request refused");
    let body = format!("airlock: {reason}\n");
    conn.ctx
        .audit
        .record(info.event(status.as_u16(), body.len() as u64, Some(reason)));
    let mut res = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(http::header::UPGRADE)
        && req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<Conn>,
) -> Result<Response<ProxyBody>, Infallible> {
    let info = Req {
        method: req.method().to_string(),
        host: conn.host(),
        // As the guest sent it: placeholders, never values.
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
    };
    match request_host(req.uri(), req.headers()) {
        Err(Refused(r)) => return Ok(refuse(&conn, &info, StatusCode::BAD_REQUEST, r)),
        Ok(h) => {
            if let (Some(name), Some(h)) = (&conn.target.name, &h) {
                if h != name {
                    let r = format!("domain fronting: request for {h} on a connection to {name}");
                    return Ok(refuse(&conn, &info, StatusCode::FORBIDDEN, r));
                }
            }
            if conn.target.name.is_some() && h.is_none() && req.version() != Version::HTTP_10 {
                let r = "request without a Host".to_string();
                return Ok(refuse(&conn, &info, StatusCode::BAD_REQUEST, r));
            }
        }
    }
    if req.method() == Method::CONNECT {
        let r = "CONNECT is not supported through the proxy".to_string();
        return Ok(refuse(&conn, &info, StatusCode::METHOD_NOT_ALLOWED, r));
    }
    let upgrade = is_upgrade(&req);
    let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let name = conn.target.name.as_deref();
    let secrets = &conn.ctx.secrets;
    let subs = match rewrite_head(&mut parts.uri, &mut parts.headers, name, secrets) {
        Ok(s) => s,
        Err(Refused(r)) => return Ok(refuse(&conn, &info, StatusCode::FORBIDDEN, r)),
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // A host that may hold a secret value is asked for uncompressed responses, so a value it
    // echoes can be masked on the way back.
    let bound_host = name.is_some_and(|n| secrets.bound_to(n));
    if bound_host {
        parts.headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }

    // Bodies: substituted only for in_body secrets and bounded sizes; otherwise streamed.
    let mut body_subs = Vec::new();
    let body: ProxyBody = match name {
        Some(n)
            if secrets.in_body_for(n)
                && body
                    .size_hint()
                    .upper()
                    .is_some_and(|u| u <= MAX_SUBST_BODY) =>
        {
            let bytes = match Limited::new(body, MAX_SUBST_BODY as usize).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    let r = format!("reading the request body failed: {e}");
                    return Ok(refuse(&conn, &info, StatusCode::BAD_REQUEST, r));
                }
            };
            let bytes = match secrets.rewrite(&bytes, Some(n), Location::Body) {
                Ok(Some((new, used))) => {
                    body_subs = used;
                    parts.headers.insert(
                        http::header::CONTENT_LENGTH,
                        HeaderValue::from(new.len() as u64),
                    );
                    Bytes::from(new)
                }
                _ => bytes,
            };
            Full::new(bytes).map_err(|e: Infallible| match e {}).boxed()
        }
        _ => body.map_err(|e| Box::new(e) as BoxError).boxed(),
    };

    // Over plain HTTP a value would cross the network in the clear: only by explicit choice.
    if !conn.tls {
        let used = subs
            .iter()
            .map(|(i, _)| *i)
            .chain(body_subs.iter().copied());
        if let Some(i) = used.into_iter().find(|&i| !secrets.allows_http(i)) {
            let n = secrets.name(i);
            let r = format!(
                "secret {n} is not sent over plain HTTP to {}: use https://, or start the \
                 sandbox with --secret-allow-http {n}",
                name.unwrap_or("this host")
            );
            return Ok(refuse(&conn, &info, StatusCode::FORBIDDEN, r));
        }
    }
    let sender = match conn.sender(upgrade).await {
        Ok(s) => s,
        Err(e) => return Ok(refuse(&conn, &info, StatusCode::BAD_GATEWAY, e)),
    };
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let scheme = if conn.tls { "https" } else { "http" };
    let authority = conn.authority();
    parts.headers.remove(http::header::HOST);
    let (uri, version) = match &sender {
        Sender::H2(_) => (
            Uri::builder()
                .scheme(scheme)
                .authority(authority.as_str())
                .path_and_query(path)
                .build(),
            Version::HTTP_2,
        ),
        Sender::H1(_) => {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(http::header::HOST, v);
            }
            (
                Uri::builder().path_and_query(path).build(),
                Version::HTTP_11,
            )
        }
    };
    parts.uri = match uri {
        Ok(u) => u,
        Err(_) => {
            let r = "cannot build the upstream URL".to_string();
            return Ok(refuse(&conn, &info, StatusCode::BAD_REQUEST, r));
        }
    };
    parts.version = version;
    let up_req = Request::from_parts(parts, body);

    for (i, loc) in subs
        .iter()
        .copied()
        .chain(body_subs.into_iter().map(|i| (i, Location::Body)))
    {
        conn.ctx.audit.record(Event::Substitution {
            secret: secrets.name(i).to_string(),
            host: info.host.clone(),
            location: loc.as_str().into(),
        });
    }

    let res = match sender {
        Sender::H2(mut s) => s.send_request(up_req).await,
        Sender::H1(mut s) => {
            let r = s.send_request(up_req).await;
            if !upgrade {
                conn.give_back(s);
            }
            r
        }
    };
    let mut res = match res {
        Ok(r) => r,
        Err(e) => {
            let r = format!("upstream {} failed: {e}", info.host);
            return Ok(refuse(&conn, &info, StatusCode::BAD_GATEWAY, r));
        }
    };
    let status = res.status();
    if let Some(guest_up) = guest_upgrade {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let up = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                if let (Ok(g), Ok(u)) = tokio::join!(guest_up, up) {
                    let mut g = TokioIo::new(g);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut g, &mut u).await;
                }
            });
            conn.ctx.audit.record(info.event(101, 0, None));
            let (mut parts, _) = res.into_parts();
            parts.version = Version::HTTP_11;
            scrub_headers(&mut parts.headers, secrets);
            let body = http_body_util::Empty::new()
                .map_err(|e: Infallible| match e {})
                .boxed();
            return Ok(Response::from_parts(parts, body));
        }
    }
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    scrub_headers(&mut parts.headers, secrets);
    parts.version = conn.guest_version;
    // Echoed values are masked in identity-encoded bodies from hosts that may have them.
    let identity = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let scrub = (bound_host && identity).then(|| conn.ctx.clone());
    let body = Counted {
        inner: body,
        bytes: 0,
        done: Some((conn.ctx.audit.clone(), info, status.as_u16())),
        scrub,
        carry: Vec::new(),
        trailers: None,
    };
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Replaces echoed secret values in response headers with their placeholders.
fn scrub_headers(headers: &mut http::HeaderMap, secrets: &Secrets) {
    for v in headers.values_mut() {
        if let Some(new) = secrets.scrub(v.as_bytes()) {
            if let Ok(nv) = HeaderValue::from_bytes(&new) {
                *v = nv;
            }
        }
    }
}

/// A response body that masks echoed secret values (when `scrub` is set), counts the bytes
/// passed to the guest and writes the request's audit event when it ends (completed, failed
/// or abandoned).
struct Counted {
    inner: Incoming,
    bytes: u64,
    done: Option<(Audit, Req, u16)>,
    scrub: Option<Arc<ProxyContext>>,
    /// Held-back end of the last chunk that may be the start of a value.
    carry: Vec<u8>,
    /// Trailers waiting behind the flushed carry.
    trailers: Option<Frame<Bytes>>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(t) = self.trailers.take() {
                return Poll::Ready(Some(Ok(t)));
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(f))) => f,
                Poll::Ready(Some(Err(e))) => {
                    let reason = format!("upstream response failed: {e}");
                    self.finish(Some(reason));
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(None) => {
                    if !self.carry.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(self.flush_carry()))));
                    }
                    self.finish(None);
                    return Poll::Ready(None);
                }
            };
            let data = match frame.into_data() {
                Ok(d) => d,
                Err(trailers) => {
                    if !self.carry.is_empty() {
                        self.trailers = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(self.flush_carry()))));
                    }
                    return Poll::Ready(Some(Ok(trailers)));
                }
            };
            let out = match self.scrub.clone() {
                None => data,
                Some(ctx) => {
                    let mut carry = std::mem::take(&mut self.carry);
                    let out = ctx.secrets.mask_chunk(&mut carry, &data);
                    self.carry = carry;
                    Bytes::from(out)
                }
            };
            if out.is_empty() {
                continue;
            }
            self.bytes += out.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(out))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.carry.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking keeps lengths, so only the held-back bytes are added.
        let h = self.inner.size_hint();
        let c = self.carry.len() as u64;
        let mut out = SizeHint::new();
        out.set_lower(h.lower() + c);
        if let Some(u) = h.upper() {
            out.set_upper(u + c);
        }
        out
    }
}

impl Counted {
    fn flush_carry(&mut self) -> Bytes {
        let c = std::mem::take(&mut self.carry);
        self.bytes += c.len() as u64;
        Bytes::from(c)
    }

    fn finish(&mut self, reason: Option<String>) {
        if let Some((audit, info, status)) = self.done.take() {
            audit.record(info.event(status, self.bytes, reason));
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(None);
    }
}
