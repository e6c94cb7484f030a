//! TEMPORARY relay until the TLS/HTTP proxy (branch `mitm`) merges: same interface, plain
//! passthrough. Never lands on its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::Audit;

/// Errors setting the proxy up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProxyError(pub String);

/// One secret as the proxy sees it.
#[derive(Clone)]
pub struct Secret {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
    /// Hosts.
    pub hosts: Vec<String>,
    /// Placeholder.
    pub placeholder: Option<String>,
    /// Body substitution.
    pub in_body: bool,
}

/// Shared by all connections of one sandbox.
pub struct ProxyContext {
    #[allow(dead_code)]
    audit: Audit,
}

impl ProxyContext {
    /// New context.
    pub fn new(
        _secrets: Vec<Secret>,
        _extra_roots: &[PathBuf],
        audit: Audit,
    ) -> Result<ProxyContext, ProxyError> {
        Ok(ProxyContext { audit })
    }
    /// CA PEM.
    pub fn ca_pem(&self) -> String {
        String::new()
    }
    /// Placeholders.
    pub fn placeholders(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Whether `name` is intercepted.
    pub fn intercepts(&self, _name: &str) -> bool {
        false
    }
}

/// Where the guest was going.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name behind the synthetic address.
    pub name: Option<String>,
    /// Port.
    pub port: u16,
    /// Checked upstream address.
    pub upstream: SocketAddr,
}

/// Serves one connection.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut guest: S,
    target: Target,
    _ctx: Arc<ProxyContext>,
) {
    let Ok(Ok(mut up)) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(target.upstream),
    )
    .await
    else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut up).await;
}
