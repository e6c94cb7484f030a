//! Content-addressed blob store and image index.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ImageConfig;
use crate::error::{Error, IoContext, Result};
use crate::lock::{self, FileLock, Mode};
use crate::pull::Platform;
use crate::reference::{validate_digest, Reference};

const INDEX_FILE: &str = "index.json";
const INDEX_LOCK: &str = "index.lock";
const GC_LOCK: &str = "gc.lock";
const INDEX_VERSION: u32 = 1;

/// Airlock's data directory: `$AIRLOCK_DATA_DIR`, else `$XDG_DATA_HOME/airlock`, else
/// `~/.local/share/airlock`. `None` only when none of those variables is set.
pub fn default_data_dir() -> Option<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = non_empty("AIRLOCK_DATA_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = non_empty("XDG_DATA_HOME") {
        return Some(PathBuf::from(d).join("airlock"));
    }
    non_empty("HOME").map(|h| PathBuf::from(h).join(".local/share/airlock"))
}

/// One layer of a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the layer blob as stored (compressed, if the layer is compressed).
    pub digest: String,
    /// Media type from the manifest (tells the compression).
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// What the store knows about one image: an entry of the image index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference the image was pulled or imported as (canonical form).
    pub reference: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Media type of the image manifest (OCI or Docker schema 2).
    pub manifest_media_type: String,
    /// Digest of the image index / manifest list the manifest was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    /// Digest of the image configuration blob.
    pub config_digest: String,
    /// Layers, base layer first.
    pub layers: Vec<LayerRecord>,
    /// Platform of the image.
    pub platform: Platform,
    /// Total size in bytes of manifest, config and layers.
    pub size: u64,
    /// Seconds since the Unix epoch when the record was written.
    pub created: u64,
}

impl ImageRecord {
    /// Digests of every blob this record keeps alive.
    pub fn blob_digests(&self) -> Vec<&str> {
        let mut v = vec![self.manifest_digest.as_str(), self.config_digest.as_str()];
        if let Some(i) = &self.index_digest {
            v.push(i);
        }
        v.extend(self.layers.iter().map(|l| l.digest.as_str()));
        v
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    images: BTreeMap<String, ImageRecord>,
}

/// A content-addressed image store on disk.
///
/// Layout under the root directory:
///
/// * `blobs/sha256/<hex>`: blobs, written once through a temp file, fsync and rename after
///   their digest was verified; a blob visible here is always complete and correct.
/// * `tmp/`: temp files of writes in progress, each `flock`ed by its writer; those whose
///   writer died are removed by [`Store::open`] and [`Store::gc`].
/// * `index.json`: reference → [`ImageRecord`], rewritten atomically under `index.lock`.
/// * `gc.lock`: held shared by pulls/imports and exclusively by [`Store::gc`], so a
///   collection never removes blobs of an image still being written.
/// * `locks/`: per-blob download locks (256 buckets), so concurrent pulls of the same image
///   download each blob once.
///
/// `Store` is cheap to clone and safe to use from several threads and processes.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The default store directory: `images/` under [`default_data_dir`].
    pub fn default_dir() -> Result<PathBuf> {
        default_data_dir().map(|d| d.join("images")).ok_or_else(|| {
            Error::io(
                "cannot find a data directory",
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "none of AIRLOCK_DATA_DIR, XDG_DATA_HOME, HOME is set",
                ),
            )
        })
    }

    /// Opens the store at [`Store::default_dir`].
    pub fn open_default() -> Result<Store> {
        Store::open(Store::default_dir()?)
    }

    /// Opens (creating if needed) the store rooted at `dir`, and removes temp files left by
    /// interrupted writers.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let root = dir.as_ref().to_path_buf();
        for sub in ["blobs/sha256", "tmp", "locks"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
        }
        let store = Store { root };
        store.clean_temp()?;
        Ok(store)
    }

    /// The root directory of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path where the blob with `digest` is (or would be) stored.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        validate_digest(digest)?;
        Ok(self
            .root
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..]))
    }

    /// True if the blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Opens a stored blob for reading.
    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let p = self.blob_path(digest)?;
        File::open(&p).ctx(|| format!("open blob {digest}"))
    }

    /// Reads a whole blob into memory and checks it still hashes to `digest`.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut data)
            .ctx(|| format!("read blob {digest}"))?;
        let actual = sha256_digest(&data);
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: "stored blob".into(),
                expected: digest.into(),
                actual,
            });
        }
        Ok(data)
    }

    /// Every image in the store, ordered by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let _l = self.lock(INDEX_LOCK, Mode::Shared)?;
        Ok(self.read_index()?.images.into_values().collect())
    }

    /// Finds the stored image for `reference`: an exact match of its canonical form, or, for
    /// a reference pinned by digest, an image of the same repository with that manifest or
    /// index digest.
    pub fn resolve(&self, reference: &Reference) -> Result<ImageRecord> {
        let _l = self.lock(INDEX_LOCK, Mode::Shared)?;
        let index = self.read_index()?;
        find(&index, reference)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| Error::NotFound(reference.to_string()))
    }

    /// Removes the image entry for `reference` (see [`Store::resolve`] for matching) and
    /// returns it. Blobs stay until [`Store::gc`].
    pub fn remove(&self, reference: &Reference) -> Result<ImageRecord> {
        let _l = self.lock(INDEX_LOCK, Mode::Exclusive)?;
        let mut index = self.read_index()?;
        let key = find(&index, reference)
            .map(|(k, _)| k.clone())
            .ok_or_else(|| Error::NotFound(reference.to_string()))?;
        let rec = index.images.remove(&key).expect("key just found");
        self.write_index(&index)?;
        Ok(rec)
    }

    /// Deletes every blob no image references, and stale temp files. Waits for pulls and
    /// imports in progress to finish. Returns the number of bytes freed.
    pub fn gc(&self) -> Result<u64> {
        let _gc = self.lock(GC_LOCK, Mode::Exclusive)?;
        let _l = self.lock(INDEX_LOCK, Mode::Shared)?;
        let index = self.read_index()?;
        let keep: HashSet<String> = index
            .images
            .values()
            .flat_map(|r| r.blob_digests())
            .filter_map(|d| d.strip_prefix("sha256:").map(str::to_string))
            .collect();
        let mut freed = 0;
        let dir = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
            let entry = entry.ctx(|| format!("read {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(entry.path()) {
                Ok(()) => freed += len,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("remove blob {name}"), e)),
            }
            tracing::debug!(blob = %name, bytes = len, "gc removed blob");
        }
        freed += self.clean_temp()?;
        Ok(freed)
    }

    /// Reads the runtime configuration of a stored image.
    pub fn image_config(&self, record: &ImageRecord) -> Result<ImageConfig> {
        ImageConfig::from_json(&self.read_blob(&record.config_digest)?)
    }

    // ----- crate-internal API -----

    /// Inserts or replaces the record under its reference.
    pub(crate) fn put_record(&self, record: ImageRecord) -> Result<()> {
        let _l = self.lock(INDEX_LOCK, Mode::Exclusive)?;
        for d in record.blob_digests() {
            if !self.has_blob(d) {
                return Err(Error::io(
                    format!("record {}", record.reference),
                    io::Error::new(io::ErrorKind::NotFound, format!("blob {d} missing")),
                ));
            }
        }
        let mut index = self.read_index()?;
        index.images.insert(record.reference.clone(), record);
        self.write_index(&index)
    }

    /// The shared side of the gc lock; hold it while writing blobs that are not yet recorded.
    pub(crate) async fn writer_guard(&self) -> Result<FileLock> {
        let p = self.root.join(GC_LOCK);
        FileLock::acquire_async(&p, Mode::Shared)
            .await
            .ctx(|| format!("lock {}", p.display()))
    }

    /// Blocking variant of [`Store::writer_guard`].
    pub(crate) fn writer_guard_blocking(&self) -> Result<FileLock> {
        self.lock(GC_LOCK, Mode::Shared)
    }

    /// Exclusive per-blob (bucketed) download lock.
    pub(crate) async fn blob_lock(&self, digest: &str) -> Result<FileLock> {
        validate_digest(digest)?;
        let bucket = &digest["sha256:".len().."sha256:".len() + 2];
        let p = self.root.join("locks").join(format!("{bucket}.lock"));
        FileLock::acquire_async(&p, Mode::Exclusive)
            .await
            .ctx(|| format!("lock {}", p.display()))
    }

    /// A new temp file in `tmp/`, locked by us.
    pub(crate) fn temp(&self) -> Result<TempBlob> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = self.root.join("tmp");
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!(
                "{}-{}-{}.tmp",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                nanos
            );
            let path = dir.join(name);
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
            };
            lock::lock_file_exclusive(&file).ctx(|| format!("lock {}", path.display()))?;
            // A cleaner may have removed the file between create and lock; then retry.
            let ours = file.metadata().ok();
            let named = fs::metadata(&path).ok();
            match (ours, named) {
                (Some(a), Some(b)) if a.ino() == b.ino() && a.dev() == b.dev() => {}
                _ => continue,
            }
            return Ok(TempBlob {
                file,
                path,
                hasher: Sha256::new(),
                size: 0,
                done: false,
                root: self.root.clone(),
            });
        }
    }

    /// Stores `data`, verifying it against `expected` when given. Returns its digest.
    pub(crate) fn put_bytes(&self, data: &[u8], expected: Option<&str>) -> Result<String> {
        let digest = sha256_digest(data);
        if let Some(e) = expected {
            if e != digest {
                return Err(Error::DigestMismatch {
                    what: "blob".into(),
                    expected: e.into(),
                    actual: digest,
                });
            }
        }
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut t = self.temp()?;
        t.write_all(data).ctx(|| "write temp blob".to_string())?;
        t.commit(&digest)?;
        Ok(digest)
    }

    fn lock(&self, name: &str, mode: Mode) -> Result<FileLock> {
        let p = self.root.join(name);
        FileLock::acquire(&p, mode).ctx(|| format!("lock {}", p.display()))
    }

    fn read_index(&self) -> Result<IndexFile> {
        let p = self.root.join(INDEX_FILE);
        match fs::read(&p) {
            Ok(data) => {
                let idx: IndexFile = serde_json::from_slice(&data)
                    .map_err(|e| Error::doc(format!("image index {}", p.display()), e))?;
                if idx.version != INDEX_VERSION {
                    return Err(Error::doc(
                        format!("image index {}", p.display()),
                        format!("unsupported version {}", idx.version),
                    ));
                }
                Ok(idx)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IndexFile {
                version: INDEX_VERSION,
                images: BTreeMap::new(),
            }),
            Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
        }
    }

    /// Must be called with the index lock held exclusively.
    fn write_index(&self, index: &IndexFile) -> Result<()> {
        let p = self.root.join(INDEX_FILE);
        let data = serde_json::to_vec_pretty(index).expect("index serializes");
        let mut t = self.temp()?;
        t.write_all(&data).ctx(|| "write index".to_string())?;
        t.persist_to(&p)
    }

    /// Removes temp files whose writer is gone. Returns bytes freed.
    fn clean_temp(&self) -> Result<u64> {
        let dir = self.root.join("tmp");
        let mut freed = 0;
        for entry in fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            let Ok(file) = OpenOptions::new().read(true).open(&path) else {
                continue;
            };
            if let Ok(true) = lock::try_lock_exclusive(&file) {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(&path).is_ok() {
                    tracing::debug!(path = %path.display(), "removed stale temp file");
                    freed += len;
                }
            }
        }
        Ok(freed)
    }
}

fn find<'a>(index: &'a IndexFile, reference: &Reference) -> Option<(&'a String, &'a ImageRecord)> {
    let key = reference.to_string();
    if let Some(found) = index.images.get_key_value(&key) {
        return Some(found);
    }
    let digest = reference.digest()?;
    let name = reference.name();
    index.images.iter().find(|(_, r)| {
        (r.manifest_digest == digest || r.index_digest.as_deref() == Some(digest))
            && Reference::parse(&r.reference)
                .map(|rr| rr.name() == name)
                .unwrap_or(false)
    })
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync {}", dir.display()))
}

/// A file being written in the store's `tmp/` directory, hashed on the way. Removed on
/// drop unless committed.
#[derive(Debug)]
pub(crate) struct TempBlob {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    done: bool,
    root: PathBuf,
}

impl Write for TempBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl TempBlob {
    /// Bytes written so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Digest of the bytes written so far.
    pub(crate) fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Reads back everything written (for small documents).
    pub(crate) fn read_all(&mut self, limit: u64) -> Result<Vec<u8>> {
        if self.size > limit {
            return Err(Error::InvalidArchive(format!(
                "metadata file of {} bytes exceeds the {limit} byte limit",
                self.size
            )));
        }
        let mut out = Vec::with_capacity(self.size as usize);
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&self.file).read_to_end(&mut out))
            .ctx(|| format!("read {}", self.path.display()))?;
        self.file
            .seek(SeekFrom::End(0))
            .ctx(|| format!("seek {}", self.path.display()))?;
        Ok(out)
    }

    /// A second handle on the temp file, positioned at its start.
    pub(crate) fn reopen(&self) -> Result<File> {
        File::open(&self.path).ctx(|| format!("open {}", self.path.display()))
    }

    /// Verifies the content against `expected`, then fsyncs and renames it into
    /// `blobs/sha256/`. On mismatch the temp file is removed and nothing is stored.
    pub(crate) fn commit(mut self, expected: &str) -> Result<()> {
        validate_digest(expected)?;
        let actual = self.digest();
        if actual != expected {
            return Err(Error::DigestMismatch {
                what: "blob".into(),
                expected: expected.into(),
                actual,
            });
        }
        let dest = self
            .root
            .join("blobs/sha256")
            .join(&expected["sha256:".len()..]);
        if dest.is_file() {
            // Someone else stored the same content meanwhile; ours is dropped.
            return Ok(());
        }
        self.file
            .sync_all()
            .ctx(|| format!("fsync {}", self.path.display()))?;
        fs::rename(&self.path, &dest).ctx(|| format!("rename to {}", dest.display()))?;
        self.done = true;
        fsync_dir(dest.parent().expect("blob has parent"))
    }

    /// Fsyncs and renames the file to `dest` (any path in the store).
    fn persist_to(mut self, dest: &Path) -> Result<()> {
        self.file
            .sync_all()
            .ctx(|| format!("fsync {}", self.path.display()))?;
        fs::rename(&self.path, dest).ctx(|| format!("rename to {}", dest.display()))?;
        self.done = true;
        fsync_dir(dest.parent().expect("file in store has parent"))
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}
