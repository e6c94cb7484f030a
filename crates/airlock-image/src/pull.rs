//! Pulling images from a registry.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::reference::{is_loopback_registry, validate_digest, Reference};
use crate::store::{sha256_digest, ImageRecord, LayerRecord, Store};
use crate::{
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};

const MAX_MANIFEST_SIZE: usize = 4 << 20;
const CONCURRENT_DOWNLOADS: usize = 3;

/// An image platform: `os/architecture[/variant]`, e.g. `linux/amd64` or `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// CPU architecture in GOARCH spelling (`amd64`, `arm64`, `arm`, …).
    pub architecture: String,
    /// CPU variant (`v7`, `v8`, …), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    /// `linux/amd64`.
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant`.
    pub fn parse(s: &str) -> Result<Platform> {
        let bad = || Error::doc("platform", format!("{s:?} is not os/arch[/variant]"));
        let parts: Vec<&str> = s.split('/').collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || p.chars().any(char::is_whitespace))
        {
            return Err(bad());
        }
        match parts[..] {
            [os, arch] => Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            [os, arch, v] => Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: Some(v.into()),
            }),
            _ => Err(bad()),
        }
    }

    /// True if an image built for `other` satisfies a request for `self`. A request without
    /// variant accepts any variant; `arm64` treats a missing variant as `v8`.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        match (&self.variant, &other.variant) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(a), None) => self.architecture == "arm64" && a == "v8",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Platform::parse(s)
    }
}

/// What happened to one blob during a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    /// Already in the store; nothing downloaded.
    Cached,
    /// Bytes are arriving (`done` grows).
    Downloading,
    /// Downloaded, verified and stored.
    Complete,
}

/// A progress report for one blob (the config or a layer) of the image being pulled.
#[derive(Debug, Clone)]
pub struct ProgressEvent {
    /// Digest of the blob.
    pub digest: String,
    /// Media type of the blob; layers have `…layer…` or `…rootfs…` types.
    pub media_type: String,
    /// True for layers, false for the config blob.
    pub is_layer: bool,
    /// Bytes downloaded so far (equal to `total` for cached and complete blobs).
    pub done: u64,
    /// Size of the blob from the manifest.
    pub total: u64,
    /// Current state.
    pub state: ProgressState,
}

/// Progress callback; called from the pulling task, so it should return quickly.
pub type ProgressFn = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// Options of [`pull`].
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Platform to select from a multi-platform index (default `linux/amd64`).
    pub platform: Platform,
    /// Registries (`host` or `host:port`) that may be reached over plain HTTP. Loopback
    /// registries (`localhost`, `127.0.0.0/8`, `[::1]`) always may.
    pub insecure_registries: Vec<String>,
    /// Called for every blob as it is skipped, downloaded and stored.
    pub progress: Option<ProgressFn>,
    /// Explicit `(username, password)`; overrides the Docker config file.
    pub credentials: Option<(String, String)>,
    /// Docker config file to read credentials from; default `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`. A missing file means anonymous access.
    pub docker_config: Option<PathBuf>,
}

impl fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullOptions")
            .field("platform", &self.platform)
            .field("insecure_registries", &self.insecure_registries)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("docker_config", &self.docker_config)
            .finish()
    }
}

impl PullOptions {
    fn uses_http(&self, registry: &str) -> bool {
        is_loopback_registry(registry)
            || self.insecure_registries.iter().any(|r| {
                let r = r
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/');
                r == registry || crate::reference::host_of(registry) == r
            })
    }
}

struct Ctx<'a> {
    client: Client,
    auth: RegistryAuth,
    reference: &'a Reference,
    store: &'a Store,
    progress: Option<ProgressFn>,
}

impl Ctx<'_> {
    fn reg_err(&self, e: oci_client::errors::OciDistributionError) -> Error {
        Error::Registry {
            reference: self.reference.to_string(),
            source: e,
        }
    }

    fn emit(&self, ev: ProgressEvent) {
        if let Some(p) = &self.progress {
            p(&ev);
        }
    }

    /// Fetches a manifest or index by `reference` and checks its digest.
    async fn fetch_manifest(
        &self,
        oref: &oci_client::Reference,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, String)> {
        let accept = [
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_DOCKER_MANIFEST,
            MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        ];
        let (body, _) = self
            .client
            .pull_manifest_raw(oref, &self.auth, &accept)
            .await
            .map_err(|e| self.reg_err(e))?;
        if body.len() > MAX_MANIFEST_SIZE {
            return Err(Error::doc("manifest", "larger than 4 MiB"));
        }
        let digest = sha256_digest(&body);
        if let Some(exp) = expected {
            if exp != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest of {}", self.reference),
                    expected: exp.into(),
                    actual: digest,
                });
            }
        }
        Ok((body.to_vec(), digest))
    }

    async fn fetch_blob(&self, oref: &oci_client::Reference, blob: &BlobInfo) -> Result<()> {
        let ev = |done, state| ProgressEvent {
            digest: blob.digest.clone(),
            media_type: blob.media_type.clone(),
            is_layer: blob.is_layer,
            done,
            total: blob.size,
            state,
        };
        if self.store.has_blob(&blob.digest) {
            self.emit(ev(blob.size, ProgressState::Cached));
            return Ok(());
        }
        let _lock = self.store.blob_lock(&blob.digest).await?;
        if self.store.has_blob(&blob.digest) {
            self.emit(ev(blob.size, ProgressState::Cached));
            return Ok(());
        }
        self.emit(ev(0, ProgressState::Downloading));
        let mut temp = self.store.temp()?;
        let mut stream = self
            .client
            .pull_blob_stream(oref, blob.digest.as_str())
            .await
            .map_err(|e| self.reg_err(e))?;
        loop {
            match stream.next().await {
                None => break,
                Some(Ok(chunk)) => {
                    if temp.size() + chunk.len() as u64 > blob.size {
                        return Err(Error::SizeMismatch {
                            digest: blob.digest.clone(),
                            expected: blob.size,
                            actual: temp.size() + chunk.len() as u64,
                        });
                    }
                    temp.write_all(&chunk)
                        .ctx(|| format!("write blob {}", blob.digest))?;
                    self.emit(ev(temp.size(), ProgressState::Downloading));
                }
                Some(Err(e)) => {
                    // oci-client's verifying stream fails at the end on a digest mismatch;
                    // report that as such when every byte arrived.
                    if temp.size() == blob.size && temp.digest() != blob.digest {
                        break;
                    }
                    return Err(Error::io(format!("download blob {}", blob.digest), e));
                }
            }
        }
        if temp.size() != blob.size {
            return Err(Error::SizeMismatch {
                digest: blob.digest.clone(),
                expected: blob.size,
                actual: temp.size(),
            });
        }
        temp.commit(&blob.digest).map_err(|e| match e {
            Error::DigestMismatch {
                expected, actual, ..
            } => Error::DigestMismatch {
                what: format!("blob of {}", self.reference),
                expected,
                actual,
            },
            e => e,
        })?;
        self.emit(ev(blob.size, ProgressState::Complete));
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct BlobInfo {
    digest: String,
    media_type: String,
    size: u64,
    is_layer: bool,
}

impl BlobInfo {
    /// The blob a manifest descriptor names, its digest checked for form.
    fn of(d: &oci_spec::image::Descriptor, is_layer: bool) -> Result<BlobInfo> {
        let info = BlobInfo {
            digest: d.digest().to_string(),
            media_type: d.media_type().to_string(),
            size: d.size(),
            is_layer,
        };
        validate_digest(&info.digest)?;
        Ok(info)
    }
}

fn is_index(media_type: Option<&str>, body: &serde_json::Value) -> bool {
    match media_type {
        Some(MEDIA_TYPE_OCI_INDEX) | Some(MEDIA_TYPE_DOCKER_MANIFEST_LIST) => true,
        Some(_) => false,
        None => body.get("manifests").is_some() && body.get("layers").is_none(),
    }
}

fn descriptor_platform(d: &oci_spec::image::Descriptor) -> Option<Platform> {
    d.platform().as_ref().map(|p| Platform {
        os: p.os().to_string(),
        architecture: p.architecture().to_string(),
        variant: p.variant().clone().filter(|v| !v.is_empty()),
    })
}

/// Pulls `reference` into `store` and records it; returns the stored record.
///
/// * A multi-platform index is resolved to `options.platform`; if it has no such image the
///   error lists the platforms it offers.
/// * Manifests and blobs are verified against their digests (and sizes) before they become
///   visible in the store; on a mismatch the pull fails and the bad blob is not stored.
///   (Blobs of the same image already verified and stored stay until [`Store::gc`].)
/// * Blobs already in the store are not downloaded again; concurrent pulls of the same
///   image (threads or processes) download each blob once.
/// * Plain HTTP is used only for loopback registries and `options.insecure_registries`.
/// * Auth: explicit credentials, else `auths.<registry>.auth` from the Docker config file,
///   else anonymous; bearer-token challenges are answered by `oci-client`.
pub async fn pull(
    store: &Store,
    reference: &Reference,
    options: &PullOptions,
) -> Result<ImageRecord> {
    let registry = reference.registry().to_string();
    let protocol = if options.uses_http(&registry) {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    });
    let auth = match &options.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => {
            crate::credentials::docker_credentials(options.docker_config.as_deref(), &registry)?
        }
    };
    let ctx = Ctx {
        client,
        auth,
        reference,
        store,
        progress: options.progress.clone(),
    };
    let _writer = store.writer_guard().await?;

    let oref = reference.to_oci();
    let (body, digest) = ctx.fetch_manifest(&oref, reference.digest()).await?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| Error::doc("manifest", e))?;
    let media_type = value
        .get("mediaType")
        .and_then(|v| v.as_str())
        .map(str::to_string);

    let (index, manifest_body, manifest_digest, manifest_media_type) =
        if is_index(media_type.as_deref(), &value) {
            let index: ImageIndex =
                serde_json::from_slice(&body).map_err(|e| Error::doc("image index", e))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|d| descriptor_platform(d).is_some_and(|p| options.platform.matches(&p)))
                .ok_or_else(|| Error::PlatformNotFound {
                    reference: reference.to_string(),
                    requested: options.platform.to_string(),
                    available: index
                        .manifests()
                        .iter()
                        .filter_map(descriptor_platform)
                        .filter(|p| p.os != "unknown")
                        .map(|p| p.to_string())
                        .collect(),
                })?;
            let mdigest = chosen.digest().to_string();
            validate_digest(&mdigest)?;
            let mref = reference.with_digest(&mdigest)?.to_oci();
            let (mbody, _) = ctx.fetch_manifest(&mref, Some(&mdigest)).await?;
            if mbody.len() as u64 != chosen.size() {
                return Err(Error::SizeMismatch {
                    digest: mdigest,
                    expected: chosen.size(),
                    actual: mbody.len() as u64,
                });
            }
            let mt = chosen.media_type().to_string();
            (Some((body.clone(), digest.clone())), mbody, mdigest, mt)
        } else {
            let mt = media_type.unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.to_string());
            (None, body.clone(), digest.clone(), mt)
        };

    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_body).map_err(|e| Error::doc("image manifest", e))?;
    let config_info = BlobInfo::of(manifest.config(), false)?;
    let mut blobs = vec![config_info.clone()];
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let info = BlobInfo::of(l, true)?;
        layers.push(LayerRecord {
            digest: info.digest.clone(),
            media_type: info.media_type.clone(),
            size: info.size,
        });
        blobs.push(info);
    }

    // Download distinct blobs, a few at a time.
    let mut seen = std::collections::HashSet::new();
    blobs.retain(|b| seen.insert(b.digest.clone()));
    let ctx_ref = &ctx;
    let oref_ref = &oref;
    futures_util::stream::iter(blobs)
        .map(|b| async move { ctx_ref.fetch_blob(oref_ref, &b).await })
        .buffer_unordered(CONCURRENT_DOWNLOADS)
        .try_collect::<Vec<()>>()
        .await?;

    // Config tells the real platform.
    let cfg_bytes = store.read_blob(&config_info.digest)?;
    let cfg = crate::ImageConfig::from_json(&cfg_bytes)?;
    let platform = Platform {
        os: cfg.os().to_string(),
        architecture: cfg.architecture().to_string(),
        variant: cfg.variant().map(str::to_string),
    };
    if index.is_none() && !options.platform.matches(&platform) {
        tracing::warn!(
            reference = %reference,
            image_platform = %platform,
            requested = %options.platform,
            "image platform does not match the requested platform"
        );
    }

    let index_digest = match &index {
        Some((ibody, idigest)) => Some(store.put_bytes(ibody, Some(idigest))?),
        None => None,
    };
    store.put_bytes(&manifest_body, Some(&manifest_digest))?;

    let size =
        manifest_body.len() as u64 + config_info.size + layers.iter().map(|l| l.size).sum::<u64>();
    let record = ImageRecord {
        reference: reference.to_string(),
        manifest_digest,
        manifest_media_type,
        index_digest,
        config_digest: config_info.digest,
        layers,
        platform,
        size,
        created: now(),
    };
    store.put_record(record.clone())?;
    tracing::info!(reference = %record.reference, digest = %record.manifest_digest, "pulled image");
    Ok(record)
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(dead_code)]
    fn pull_future_is_send(store: Store, r: Reference, o: PullOptions) {
        fn assert_send<T: Send>(_: T) {}
        assert_send(async move { pull(&store, &r, &o).await });
    }

    #[test]
    fn platform_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//x").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
        let any_arm = Platform::parse("linux/arm64").unwrap();
        assert!(any_arm.matches(&p));
        assert!(p.matches(&any_arm)); // arm64 without variant is v8
        assert!(!Platform::default().matches(&p));
        assert_eq!(Platform::default().to_string(), "linux/amd64");
    }

    #[test]
    fn http_only_for_loopback_or_listed() {
        let o = PullOptions {
            insecure_registries: vec!["reg.lan:5000".into(), "http://other.lan".into()],
            ..Default::default()
        };
        assert!(o.uses_http("127.0.0.1:5000"));
        assert!(o.uses_http("127.1.2.3"));
        assert!(o.uses_http("localhost:1"));
        assert!(o.uses_http("[::1]:5000"));
        assert!(o.uses_http("reg.lan:5000"));
        assert!(o.uses_http("other.lan:8080"));
        assert!(!o.uses_http("reg.lan:5001"));
        assert!(!o.uses_http("docker.io"));
        assert!(!o.uses_http("128.0.0.1:5000"));
        assert!(!o.uses_http("localhost.evil.com"));
    }
}
