//! Importing `docker save` and OCI image-layout tarballs.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::pull::{now, Platform};
use crate::reference::{validate_digest, Reference};
use crate::store::{ImageRecord, LayerRecord, Store, TempBlob};
use crate::{
    ImageConfig, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};

const MAX_ENTRIES: usize = 100_000;
const MAX_METADATA: u64 = 16 << 20;
const MAX_LINK_HOPS: usize = 16;
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// Imports an image tarball from `reader` into `store` under the reference `tag` (parsed
/// like [`Reference::parse`], so `myimage` becomes `docker.io/library/myimage:latest`).
///
/// Accepted formats, optionally compressed as a whole with gzip or zstd:
///
/// * `docker save` output: `manifest.json` plus config and layer files (layers uncompressed
///   or compressed). The layer digests are computed, and checked against the config's
///   `rootfs.diff_ids`; an OCI manifest is synthesized for the image.
/// * OCI image layout (`skopeo copy … oci-archive:`): `oci-layout`, `index.json`,
///   `blobs/sha256/…`. Every used blob must hash to its file name. When the index holds
///   several images, the one whose `org.opencontainers.image.ref.name` matches the tag (or
///   the `linux/amd64` one) is taken.
///
/// The archive is read once, front to back, as a stream (a pipe or stdin works). Nothing is
/// ever extracted by path: every regular file goes to an anonymous temp file in the store,
/// only verified blobs are renamed into `blobs/`, and the rest is deleted. Entries with
/// absolute paths or `..` components, and links pointing outside the archive, are rejected.
pub fn import(store: &Store, tag: &str, reader: impl Read) -> Result<ImageRecord> {
    let reference = Reference::parse(tag)?;
    let _writer = store.writer_guard_blocking()?;
    let mut archive = read_archive(store, reader)?;
    let record = if archive.file("oci-layout").is_some() && archive.file("index.json").is_some() {
        import_oci(store, &reference, &mut archive)?
    } else if archive.file("manifest.json").is_some() {
        import_docker(store, &reference, &mut archive)?
    } else {
        return Err(Error::InvalidArchive(
            "neither an OCI image layout (oci-layout, index.json) nor a docker save archive \
             (manifest.json)"
                .into(),
        ));
    };
    store.put_record(record.clone())?;
    tracing::info!(reference = %record.reference, digest = %record.manifest_digest, "imported image");
    Ok(record)
}

/// Files of an archive, each in a temp file, with links resolved lexically.
struct Archive {
    files: HashMap<String, TempBlob>,
    links: HashMap<String, String>,
}

impl Archive {
    /// Follows links and returns the regular file's archive path, if any.
    fn resolve(&self, path: &str) -> Option<String> {
        let mut p = normalize_lenient(path)?;
        for _ in 0..MAX_LINK_HOPS {
            if self.files.contains_key(&p) {
                return Some(p);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }

    fn file(&self, path: &str) -> Option<&TempBlob> {
        self.resolve(path).and_then(|p| self.files.get(&p))
    }

    fn need(&self, path: &str) -> Result<String> {
        self.resolve(path)
            .ok_or_else(|| Error::InvalidArchive(format!("missing file {path:?}")))
    }

    fn read_small(&mut self, path: &str) -> Result<Vec<u8>> {
        let p = self.need(path)?;
        self.files
            .get_mut(&p)
            .expect("resolved")
            .read_all(MAX_METADATA)
    }

    fn digest_of(&self, path: &str) -> Result<(String, u64)> {
        let p = self.need(path)?;
        let f = &self.files[&p];
        Ok((f.digest(), f.size()))
    }

    /// Moves the file at `path` into the blob store, checking it hashes to `digest`.
    /// Afterwards the path no longer resolves in the archive (the blob is in the store).
    fn commit(&mut self, store: &Store, path: &str, digest: &str) -> Result<()> {
        let p = self.need(path)?;
        let actual = self.files[&p].digest();
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("archive file {path:?}"),
                expected: digest.into(),
                actual,
            });
        }
        let t = self.files.remove(&p).expect("resolved");
        if store.has_blob(digest) {
            return Ok(());
        }
        t.commit(digest)
    }
}

/// Strips `./`, and rejects absolute paths and `..`.
fn normalize_entry(raw: &str) -> Result<Option<String>> {
    if raw.starts_with('/') {
        return Err(Error::InvalidArchive(format!(
            "entry {raw:?} has an absolute path"
        )));
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::InvalidArchive(format!(
                    "entry {raw:?} contains '..'"
                )))
            }
            c => parts.push(c),
        }
    }
    Ok(if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    })
}

/// Normalizes a path inside the archive, resolving `..` lexically; `None` if it escapes.
fn normalize_lenient(raw: &str) -> Option<String> {
    if raw.starts_with('/') {
        return None;
    }
    clean_relative(raw)
}

/// Lexically cleans a relative path: `.` and empty parts dropped, `..` resolved; `None` if
/// it climbs out (a leading `/` counts as an empty part).
pub fn clean_relative(raw: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn read_archive(store: &Store, reader: impl Read) -> Result<Archive> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let head = buf.fill_buf().ctx(|| "read archive".to_string())?.to_vec();
    let decoded: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(buf))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buf).ctx(|| "zstd".to_string())?)
    } else {
        Box::new(buf)
    };
    let mut tar = tar::Archive::new(decoded);
    let mut archive = Archive {
        files: HashMap::new(),
        links: HashMap::new(),
    };
    let bad_tar = |e: io::Error| Error::InvalidArchive(format!("not a readable tar archive: {e}"));
    for (n, entry) in tar.entries().map_err(bad_tar)?.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(Error::InvalidArchive(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        let mut entry = entry.map_err(bad_tar)?;
        let raw = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| Error::InvalidArchive("entry path is not UTF-8".into()))?;
        let kind = entry.header().entry_type();
        let Some(path) = normalize_entry(&raw)? else {
            continue;
        };
        if archive.files.contains_key(&path) || archive.links.contains_key(&path) {
            return Err(Error::InvalidArchive(format!("duplicate entry {path:?}")));
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut t = store.temp()?;
                io::copy(&mut entry, &mut t).map_err(bad_tar)?;
                archive.files.insert(path, t);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let joined = if kind == tar::EntryType::Symlink {
                    let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                    format!("{parent}/{target}")
                } else {
                    target.clone()
                };
                let resolved = if target.starts_with('/') {
                    None
                } else {
                    normalize_lenient(&joined)
                };
                let Some(resolved) = resolved.filter(|r| !r.is_empty()) else {
                    return Err(Error::InvalidArchive(format!(
                        "link {path:?} points outside the archive ({target:?})"
                    )));
                };
                archive.links.insert(path, resolved);
            }
            tar::EntryType::Directory => {}
            other => {
                tracing::debug!(path = %path, kind = ?other, "ignoring archive entry");
            }
        }
    }
    Ok(archive)
}

fn media_type_str(mt: &oci_spec::image::MediaType) -> String {
    mt.to_string()
}

fn blob_path(digest: &str) -> Result<String> {
    validate_digest(digest)?;
    Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
}

fn import_oci(store: &Store, reference: &Reference, archive: &mut Archive) -> Result<ImageRecord> {
    let layout: serde_json::Value = serde_json::from_slice(&archive.read_small("oci-layout")?)
        .map_err(|e| Error::doc("oci-layout", e))?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(Error::InvalidArchive(
            "oci-layout: unsupported imageLayoutVersion".into(),
        ));
    }
    let index: ImageIndex = serde_json::from_slice(&archive.read_small("index.json")?)
        .map_err(|e| Error::doc("index.json", e))?;
    let mut candidates: Vec<Descriptor> = index.manifests().clone();
    if candidates.len() > 1 {
        let named: Vec<Descriptor> = candidates
            .iter()
            .filter(|d| {
                let name = d
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get("org.opencontainers.image.ref.name"));
                name.is_some_and(|n| {
                    Some(n.as_str()) == reference.tag() || *n == reference.to_string()
                })
            })
            .cloned()
            .collect();
        if !named.is_empty() {
            candidates = named;
        }
    }
    let mut index_digest = None;
    let desc = loop {
        let desc = choose(&candidates, reference)?;
        let mt = media_type_str(desc.media_type());
        if mt == MEDIA_TYPE_OCI_INDEX || mt == MEDIA_TYPE_DOCKER_MANIFEST_LIST {
            if index_digest.is_some() {
                return Err(Error::InvalidArchive("nested image indexes".into()));
            }
            let d = desc.digest().to_string();
            let path = blob_path(&d)?;
            let data = archive.read_small(&path)?;
            check_bytes(&data, &d, desc.size(), &path)?;
            let inner: ImageIndex =
                serde_json::from_slice(&data).map_err(|e| Error::doc("image index", e))?;
            archive.commit(store, &path, &d)?;
            index_digest = Some(d);
            candidates = inner.manifests().clone();
            continue;
        }
        break desc;
    };
    let manifest_digest = desc.digest().to_string();
    let mpath = blob_path(&manifest_digest)?;
    let mbytes = archive_bytes(store, archive, &mpath, &manifest_digest)?;
    check_bytes(&mbytes, &manifest_digest, desc.size(), &mpath)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&mbytes).map_err(|e| Error::doc("image manifest", e))?;
    let config = manifest.config();
    let config_digest = config.digest().to_string();
    let mut total = mbytes.len() as u64;
    let mut layers = Vec::new();
    let mut all = vec![(config_digest.clone(), config.size())];
    for l in manifest.layers() {
        let d = l.digest().to_string();
        layers.push(LayerRecord {
            digest: d.clone(),
            media_type: media_type_str(l.media_type()),
            size: l.size(),
        });
        all.push((d, l.size()));
    }
    for (d, size) in &all {
        let path = blob_path(d)?;
        if archive.resolve(&path).is_some() {
            let (actual, actual_size) = archive.digest_of(&path)?;
            if &actual != d {
                return Err(Error::DigestMismatch {
                    what: format!("archive file {path:?}"),
                    expected: d.clone(),
                    actual,
                });
            }
            if actual_size != *size {
                return Err(Error::SizeMismatch {
                    digest: d.clone(),
                    expected: *size,
                    actual: actual_size,
                });
            }
        } else if !store.has_blob(d) {
            return Err(Error::InvalidArchive(format!("missing file {path:?}")));
        }
    }
    for (d, _) in &all {
        let path = blob_path(d)?;
        if archive.resolve(&path).is_some() {
            archive.commit(store, &path, d)?;
        }
    }
    total += all.iter().map(|(_, s)| s).sum::<u64>();
    store.put_bytes(&mbytes, Some(&manifest_digest))?;
    let cfg = ImageConfig::from_json(&store.read_blob(&config_digest)?)?;
    Ok(ImageRecord {
        reference: reference.to_string(),
        manifest_digest,
        manifest_media_type: media_type_str(desc.media_type()),
        index_digest,
        config_digest,
        layers,
        platform: platform_of(&cfg),
        size: total,
        created: now(),
    })
}

/// Reads a small blob from the archive, or from the store if an earlier commit moved it.
fn archive_bytes(
    store: &Store,
    archive: &mut Archive,
    path: &str,
    digest: &str,
) -> Result<Vec<u8>> {
    match archive.resolve(path) {
        Some(_) => archive.read_small(path),
        None if store.has_blob(digest) => store.read_blob(digest),
        None => Err(Error::InvalidArchive(format!("missing file {path:?}"))),
    }
}

fn check_bytes(data: &[u8], digest: &str, size: u64, what: &str) -> Result<()> {
    let actual = crate::store::sha256_digest(data);
    if actual != digest {
        return Err(Error::DigestMismatch {
            what: format!("archive file {what:?}"),
            expected: digest.into(),
            actual,
        });
    }
    if data.len() as u64 != size {
        return Err(Error::SizeMismatch {
            digest: digest.into(),
            expected: size,
            actual: data.len() as u64,
        });
    }
    Ok(())
}

fn choose(candidates: &[Descriptor], reference: &Reference) -> Result<Descriptor> {
    match candidates {
        [] => Err(Error::InvalidArchive(
            "index.json lists no manifests".into(),
        )),
        [one] => Ok(one.clone()),
        many => {
            let want = Platform::default();
            let by_platform: Vec<&Descriptor> = many
                .iter()
                .filter(|d| {
                    d.platform().as_ref().is_some_and(|p| {
                        want.matches(&Platform {
                            os: p.os().to_string(),
                            architecture: p.architecture().to_string(),
                            variant: p.variant().clone(),
                        })
                    })
                })
                .collect();
            match by_platform[..] {
                [one] => Ok(one.clone()),
                _ => Err(Error::InvalidArchive(format!(
                    "archive holds {} images and none is uniquely named {} or {want}",
                    many.len(),
                    reference
                ))),
            }
        }
    }
}

fn platform_of(cfg: &ImageConfig) -> Platform {
    Platform {
        os: cfg.os().to_string(),
        architecture: cfg.architecture().to_string(),
        variant: cfg.variant().map(str::to_string),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigRootFs {
    rootfs: Option<RootFs>,
}

/// The 64-hex digest embedded in a docker-save file name (`<hex>.json`,
/// `blobs/sha256/<hex>`, `<hex>/layer.tar`, `<hex>.tar`), if it has one.
fn digest_in_name(path: &str) -> Option<String> {
    let is_hex =
        |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if let Some(h) = path.strip_prefix("blobs/sha256/") {
        return is_hex(h).then(|| format!("sha256:{h}"));
    }
    let stem = path
        .strip_suffix(".json")
        .or_else(|| path.strip_suffix(".tar"))?;
    is_hex(stem).then(|| format!("sha256:{stem}"))
}

fn import_docker(
    store: &Store,
    reference: &Reference,
    archive: &mut Archive,
) -> Result<ImageRecord> {
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&archive.read_small("manifest.json")?)
            .map_err(|e| Error::doc("manifest.json", e))?;
    let entry = match &entries[..] {
        [] => {
            return Err(Error::InvalidArchive(
                "manifest.json lists no images".into(),
            ))
        }
        [one] => one,
        many => {
            let hits: Vec<&DockerManifestEntry> = many
                .iter()
                .filter(|e| {
                    e.repo_tags.iter().flatten().any(|t| {
                        Reference::parse(t)
                            .map(|r| r == *reference)
                            .unwrap_or(false)
                    })
                })
                .collect();
            match hits[..] {
                [one] => one,
                _ => {
                    return Err(Error::InvalidArchive(format!(
                        "archive holds {} images; none is uniquely tagged {reference}",
                        many.len()
                    )))
                }
            }
        }
    };

    // Config.
    let config_bytes = archive.read_small(&entry.config)?;
    let (config_digest, config_size) = archive.digest_of(&entry.config)?;
    if let Some(named) = digest_in_name(&entry.config) {
        if named != config_digest {
            return Err(Error::DigestMismatch {
                what: format!("archive file {:?}", entry.config),
                expected: named,
                actual: config_digest,
            });
        }
    }
    let rootfs: ConfigRootFs =
        serde_json::from_slice(&config_bytes).map_err(|e| Error::doc("image config", e))?;
    let diff_ids = rootfs.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(Error::InvalidArchive(format!(
            "config lists {} layers (diff_ids) but manifest.json {}",
            diff_ids.len(),
            entry.layers.len()
        )));
    }
    let cfg = ImageConfig::from_json(&config_bytes)?;

    // Layers: compute digests, detect compression, verify diff_ids.
    let mut layers = Vec::new();
    for (path, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let (digest, size) = archive.digest_of(path)?;
        if let Some(named) = digest_in_name(path) {
            if named != digest && &named != diff_id {
                return Err(Error::DigestMismatch {
                    what: format!("archive file {path:?}"),
                    expected: named,
                    actual: digest,
                });
            }
        }
        let resolved = archive.need(path)?;
        let mut f = archive.files[&resolved].reopen()?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut f, &mut magic)?;
        let media_type = if magic[..n].starts_with(&[0x1f, 0x8b]) {
            LAYER_GZIP
        } else if magic[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LAYER_ZSTD
        } else {
            LAYER_TAR
        };
        let uncompressed = if media_type == LAYER_TAR {
            digest.clone()
        } else {
            let f = archive.files[&resolved].reopen()?;
            let mut r: Box<dyn Read> = if media_type == LAYER_GZIP {
                Box::new(flate2::read::GzDecoder::new(f))
            } else {
                Box::new(zstd::stream::read::Decoder::new(f).ctx(|| "zstd".to_string())?)
            };
            let mut h = HashWriter(Sha256::new());
            io::copy(&mut r, &mut h)
                .map_err(|e| Error::InvalidArchive(format!("layer {path:?}: {e}")))?;
            format!("sha256:{}", hex::encode(h.0.finalize()))
        };
        if &uncompressed != diff_id {
            return Err(Error::DigestMismatch {
                what: format!("layer {path:?} (config rootfs.diff_ids)"),
                expected: diff_id.clone(),
                actual: uncompressed,
            });
        }
        layers.push((
            path.clone(),
            LayerRecord {
                digest,
                media_type: media_type.to_string(),
                size,
            },
        ));
    }

    // Synthesize an OCI manifest.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": { "mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size },
        "layers": layers.iter().map(|(_, l)| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serializes");

    let config_path = entry.config.clone();
    archive.commit(store, &config_path, &config_digest)?;
    for (path, l) in &layers {
        if archive.resolve(path).is_some() {
            archive.commit(store, path, &l.digest)?;
        }
    }
    let manifest_digest = store.put_bytes(&manifest_bytes, None)?;
    let size =
        manifest_bytes.len() as u64 + config_size + layers.iter().map(|(_, l)| l.size).sum::<u64>();
    Ok(ImageRecord {
        reference: reference.to_string(),
        manifest_digest,
        manifest_media_type: MEDIA_TYPE_OCI_MANIFEST.to_string(),
        index_digest: None,
        config_digest,
        layers: layers.into_iter().map(|(_, l)| l).collect(),
        platform: platform_of(&cfg),
        size,
        created: now(),
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read archive file", e)),
        }
    }
    Ok(n)
}

struct HashWriter(Sha256);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
