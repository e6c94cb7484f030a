//! Writing new images into the store (what `airlock build` produces): layer blobs streamed
//! in, then a config and an OCI manifest composed, stored and recorded under a tag.

use std::io::{self, Write};

use crate::error::{Error, IoContext, Result};
use crate::lock::FileLock;
use crate::pull::{now, Platform};
use crate::reference::{validate_digest, Reference};
use crate::store::{sha256_digest, ImageRecord, LayerRecord, Store, TempBlob};
use crate::{ImageConfig, MEDIA_TYPE_OCI_MANIFEST};

/// Media type of an image config blob.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed layer.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Keeps [`Store::gc`] from collecting blobs written but not yet recorded; hold one while
/// writing an image (see [`Store::hold_writes`]).
#[derive(Debug)]
pub struct WriteGuard {
    _lock: FileLock,
}

/// A blob being streamed into the store; hashed as it is written. Dropped uncommitted, it
/// leaves nothing behind.
#[derive(Debug)]
pub struct BlobWriter {
    temp: TempBlob,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.temp.size()
    }

    /// Digest of what was written so far.
    pub fn digest(&self) -> String {
        self.temp.digest()
    }

    /// Makes the blob visible in the store under its digest; returns `(digest, size)`.
    pub fn commit(self) -> Result<(String, u64)> {
        let (digest, size) = (self.temp.digest(), self.temp.size());
        self.temp.commit(&digest)?;
        Ok((digest, size))
    }
}

impl Store {
    /// Holds off garbage collection until the guard is dropped (shared with other writers).
    pub fn hold_writes(&self) -> Result<WriteGuard> {
        Ok(WriteGuard {
            _lock: self.writer_guard_blocking()?,
        })
    }

    /// Starts writing a blob (a layer) into the store.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        Ok(BlobWriter { temp: self.temp()? })
    }

    /// Stores `data` as a blob and returns its digest.
    pub fn put_blob(&self, data: &[u8]) -> Result<String> {
        self.put_bytes(data, None)
    }

    /// Composes an OCI manifest for `config` (an image config JSON document whose
    /// `rootfs.diff_ids` match `layers`) and `layers` (blobs already in the store), stores
    /// config and manifest, and records the image under `tag` (replacing an older image of
    /// that tag, as `docker build -t` does). Hold a [`WriteGuard`] from before the layers
    /// were written until this returns.
    pub fn write_image(
        &self,
        tag: &str,
        config: &[u8],
        layers: &[LayerRecord],
    ) -> Result<ImageRecord> {
        let reference = Reference::parse(tag)?;
        let cfg = ImageConfig::from_json(config)?;
        for l in layers {
            validate_digest(&l.digest)?;
            if !self.has_blob(&l.digest) {
                return Err(Error::NotFound(format!("layer blob {}", l.digest)));
            }
        }
        let (manifest, config_digest) = compose_manifest(config, layers);
        self.put_bytes(config, Some(&config_digest))?;
        let manifest_digest = self.put_bytes(&manifest, None)?;
        let record = ImageRecord {
            reference: reference.to_string(),
            manifest_digest,
            manifest_media_type: MEDIA_TYPE_OCI_MANIFEST.to_string(),
            index_digest: None,
            config_digest,
            layers: layers.to_vec(),
            platform: Platform {
                os: cfg.os().to_string(),
                architecture: cfg.architecture().to_string(),
                variant: cfg.variant().map(str::to_string),
            },
            size: manifest.len() as u64
                + config.len() as u64
                + layers.iter().map(|l| l.size).sum::<u64>(),
            created: now(),
        };
        self.put_record(record.clone())?;
        tracing::info!(reference = %record.reference, digest = %record.manifest_digest, "wrote image");
        Ok(record)
    }
}

/// The OCI manifest (bytes) of an image with `config` and `layers`, and the config's digest.
/// Deterministic: the same inputs give the same manifest digest.
pub fn compose_manifest(config: &[u8], layers: &[LayerRecord]) -> (Vec<u8>, String) {
    let config_digest = sha256_digest(config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_OCI_CONFIG,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    (
        serde_json::to_vec(&manifest).expect("manifest serializes"),
        config_digest,
    )
}

/// Reads a stored blob, at most `limit` bytes (configs, manifests).
pub(crate) fn read_small(store: &Store, digest: &str, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    store
        .open_blob(digest)?
        .take(limit + 1)
        .read_to_end(&mut data)
        .ctx(|| format!("read blob {digest}"))?;
    if data.len() as u64 > limit {
        return Err(Error::doc(format!("blob {digest}"), "too large"));
    }
    Ok(data)
}
