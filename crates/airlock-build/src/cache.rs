//! The layer cache: step key → what the step produced (a layer, and the image config after
//! it). A key hashes the parent's key and everything the step depends on (the instruction
//! as expanded, build args in effect, the content of copied files), so an unchanged step
//! on an unchanged parent is a hit and boots nothing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A layer produced by a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the (gzip) blob in the image store.
    pub digest: String,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    /// Blob size.
    pub size: u64,
}

/// What a step produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The layer it added, if any.
    pub layer: Option<Layer>,
    /// The image config after the step.
    pub config: serde_json::Value,
}

/// The cache directory (`build-cache/` beside the image store's blobs).
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// Hashes `parts` (length-prefixed, so no two part lists collide) into a key.
pub fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Cache {
    /// The cache in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    /// The entry for `key`, if there is a readable one.
    pub fn get(&self, key: &str) -> Option<Entry> {
        let data = std::fs::read(self.dir.join(format!("{key}.json"))).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Records `entry` under `key` (atomically: a reader sees the old entry or the new one).
    pub fn put(&self, key: &str, entry: &Entry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let data = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::Write::write_all(&mut tmp, &data)?;
        tmp.persist(self.dir.join(format!("{key}.json")))
            .map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_round_trip() {
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        assert_eq!(key(&["x"]), key(&["x"]));
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path().join("c"));
        assert!(c.get("k").is_none());
        let e = Entry {
            layer: Some(Layer {
                digest: "sha256:1".into(),
                diff_id: "sha256:2".into(),
                size: 3,
            }),
            config: serde_json::json!({"a": 1}),
        };
        c.put("k", &e).unwrap();
        let back = c.get("k").unwrap();
        assert_eq!(back.layer, e.layer);
        assert_eq!(back.config, e.config);
        std::fs::write(d.path().join("c/bad.json"), "{").unwrap();
        assert!(c.get("bad").is_none(), "a damaged entry is a miss");
    }
}
