//! Pushing a stored image to a registry (`airlock push`), with `oci-client`: blobs the
//! registry lacks are uploaded (streamed from the store, chunked), then the manifest.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use crate::error::{Error, Result};
use crate::reference::{is_loopback_registry, Reference};
use crate::store::{ImageRecord, Store};

/// Upload chunk size (also bounds memory per blob in flight).
const CHUNK: usize = 4 << 20;
/// Largest manifest pushed (the store's own are a few KiB).
const MAX_MANIFEST: u64 = 4 << 20;

/// Progress callback of [`push`]: `(digest, uploaded)` per blob.
pub type PushProgressFn = std::sync::Arc<dyn Fn(&str, bool) + Send + Sync>;

/// Options of [`push`].
#[derive(Clone, Default)]
pub struct PushOptions {
    /// Registries (`host` or `host:port`) that may be reached over plain HTTP; loopback
    /// always may.
    pub insecure_registries: Vec<String>,
    /// Explicit `(username, password)`; overrides the Docker config file.
    pub credentials: Option<(String, String)>,
    /// Docker config file for credentials (default as for [`crate::pull`]).
    pub docker_config: Option<PathBuf>,
    /// Called with `(digest, uploaded)` per blob: `false` when the registry had it already.
    pub progress: Option<PushProgressFn>,
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("insecure_registries", &self.insecure_registries)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("docker_config", &self.docker_config)
            .finish()
    }
}

/// Pushes the stored `image` to `target` (`host[:port]/repo[:tag]`); returns the pushed
/// manifest's digest. Plain HTTP only for loopback registries and `insecure_registries`.
pub async fn push(
    store: &Store,
    image: &ImageRecord,
    target: &Reference,
    options: &PushOptions,
) -> Result<String> {
    if target.digest().is_some() {
        return Err(Error::InvalidReference {
            input: target.to_string(),
            reason: "push to a tag, not a digest".into(),
        });
    }
    let registry = target.registry().to_string();
    let http = is_loopback_registry(&registry)
        || options.insecure_registries.iter().any(|r| {
            let r = r
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/');
            r == registry || crate::reference::host_of(&registry) == r
        });
    let client = Client::new(ClientConfig {
        protocol: if http {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(300)),
        ..Default::default()
    });
    let auth = match &options.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => {
            crate::credentials::docker_credentials(options.docker_config.as_deref(), &registry)?
        }
    };
    let reg_err = |e| Error::Registry {
        reference: target.to_string(),
        source: e,
    };
    let oref = target.to_oci();
    client
        .auth(&oref, &auth, RegistryOperation::Push)
        .await
        .map_err(reg_err)?;

    let mut blobs: Vec<(String, u64)> = image
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    blobs.push((image.config_digest.clone(), 0));
    for (digest, _) in &blobs {
        if client.blob_exists(&oref, digest).await.unwrap_or(false) {
            if let Some(p) = &options.progress {
                p(digest, false);
            }
            continue;
        }
        let file = store.open_blob(digest)?;
        let stream = blob_stream(file);
        client
            .push_blob_stream(&oref, stream, digest, None)
            .await
            .map_err(reg_err)?;
        if let Some(p) = &options.progress {
            p(digest, true);
        }
    }
    let manifest = crate::write::read_small(store, &image.manifest_digest, MAX_MANIFEST)?;
    let content_type = http::HeaderValue::from_str(&image.manifest_media_type)
        .map_err(|e| Error::doc("manifest media type", e))?;
    client
        .push_manifest_raw(&oref, manifest, content_type)
        .await
        .map_err(reg_err)?;
    tracing::info!(target = %target, digest = %image.manifest_digest, "pushed image");
    Ok(image.manifest_digest.clone())
}

/// A stored blob as a stream of chunks, read on a blocking thread.
fn blob_stream(
    file: std::fs::File,
) -> impl futures_util::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<oci_client::errors::Result<bytes::Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut f = file;
        loop {
            let mut buf = vec![0u8; CHUNK];
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ =
                        tx.blocking_send(Err(oci_client::errors::OciDistributionError::IoError(e)));
                    return;
                }
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
