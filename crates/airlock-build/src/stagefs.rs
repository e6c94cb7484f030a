//! Looking things up in a stage's file system without unpacking it: its layers read in
//! order, whiteouts applied. Used where a step depends on what the image already holds
//! (`COPY f /existing-dir`, `--chown=name`).

use std::io::Read;

use airlock_image::Store;

use crate::cache::Layer;
use crate::error::{BuildError, Result};
use crate::layer::clean_path;

/// A stored layer blob, decompressed by its magic bytes.
pub(crate) fn open_layer(store: &Store, digest: &str) -> Result<Box<dyn Read>> {
    let mut f = store.open_blob(digest)?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(|e| BuildError::io(format!("read {digest}"), e))?;
    let r = std::io::Cursor::new(magic[..n].to_vec()).chain(f);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(r)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::new(r)
                .map_err(|e| BuildError::io(digest.to_string(), e))?,
        ),
        _ => Box::new(r),
    })
}

/// What `path` is after all layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Missing,
    Dir,
    /// Not a directory: (layer, entry) of its current version.
    Other(usize, usize),
}

fn hides(whiteout_of: &str, path: &str) -> bool {
    whiteout_of.is_empty() || path == whiteout_of || path.starts_with(&format!("{whiteout_of}/"))
}

fn find(store: &Store, layers: &[Layer], path: &str) -> Result<Found> {
    let bad = |d: &str, e: std::io::Error| BuildError::Layer(format!("layer {d}: {e}"));
    let mut state = Found::Missing;
    for (li, l) in layers.iter().enumerate() {
        let mut ar = tar::Archive::new(open_layer(store, &l.digest)?);
        for (ei, e) in ar.entries().map_err(|e| bad(&l.digest, e))?.enumerate() {
            let e = e.map_err(|e| bad(&l.digest, e))?;
            let Ok(p) = clean_path(&String::from_utf8_lossy(&e.path_bytes())) else {
                continue;
            };
            let (parent, name) = p.rsplit_once('/').unwrap_or(("", p.as_str()));
            if name == ".wh..wh..opq" {
                if hides(parent, path) && path != parent {
                    state = Found::Missing;
                }
                continue;
            }
            if let Some(h) = name.strip_prefix(".wh.") {
                let hidden = if parent.is_empty() {
                    h.to_string()
                } else {
                    format!("{parent}/{h}")
                };
                if hides(&hidden, path) {
                    state = Found::Missing;
                }
                continue;
            }
            if p == path {
                state = if e.header().entry_type() == tar::EntryType::Directory {
                    Found::Dir
                } else {
                    Found::Other(li, ei)
                };
            } else if p.starts_with(&format!("{path}/")) {
                state = Found::Dir;
            }
        }
    }
    Ok(state)
}

/// Whether `path` (layer form, `a/b`) is a directory in the image the layers make.
pub fn is_dir(store: &Store, layers: &[Layer], path: &str) -> Result<bool> {
    Ok(path.is_empty() || find(store, layers, path)? == Found::Dir)
}

/// The contents of regular file `path`, at most `limit` bytes (`None`: missing or not a
/// plain file). Symlinks are not followed.
pub fn read_file(
    store: &Store,
    layers: &[Layer],
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    let Found::Other(li, ei) = find(store, layers, path)? else {
        return Ok(None);
    };
    let l = &layers[li];
    let bad = |e: std::io::Error| BuildError::Layer(format!("layer {}: {e}", l.digest));
    let mut ar = tar::Archive::new(open_layer(store, &l.digest)?);
    for (i, e) in ar.entries().map_err(bad)?.enumerate() {
        if i != ei {
            continue;
        }
        let e = e.map_err(bad)?;
        if e.header().entry_type() != tar::EntryType::Regular {
            return Ok(None);
        }
        let mut out = Vec::new();
        e.take(limit).read_to_end(&mut out).map_err(bad)?;
        return Ok(Some(out));
    }
    Ok(None)
}

/// Resolves `--chown=USER[:GROUP]` against the image's `/etc/passwd` and `/etc/group`
/// (numeric parts are used as they are; a user alone also gives its primary group).
pub fn resolve_owner(
    store: &Store,
    layers: &[Layer],
    spec: &str,
) -> std::result::Result<(u64, u64), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let read = |p: &str| -> String {
        read_file(store, layers, p, 4 << 20)
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let field = |text: &str, name: &str, idx: usize| -> Option<u64> {
        text.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(idx).and_then(|v| v.parse().ok()))
    };
    let (uid, primary) = match user.parse::<u64>() {
        Ok(u) => (u, u),
        Err(_) => {
            let passwd = read("etc/passwd");
            let uid = field(&passwd, user, 2).ok_or_else(|| {
                format!("--chown={spec}: no user {user:?} in the image's /etc/passwd (use a numeric UID)")
            })?;
            (uid, field(&passwd, user, 3).unwrap_or(uid))
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u64>() {
            Ok(g) => g,
            Err(_) => field(&read("etc/group"), g, 2).ok_or_else(|| {
                format!(
                    "--chown={spec}: no group {g:?} in the image's /etc/group (use a numeric GID)"
                )
            })?,
        },
    };
    Ok((uid, gid))
}

/// A layer of `store` written by `f` (for tests here and in the executor).
#[cfg(test)]
pub(crate) fn layer_in(
    store: &Store,
    f: &dyn Fn(&mut crate::layer::LayerWriter<airlock_image::BlobWriter>),
) -> Layer {
    let mut w = crate::layer::LayerWriter::new(store.blob_writer().unwrap());
    f(&mut w);
    let (b, diff_id) = w.finish().unwrap();
    let (digest, size) = b.commit().unwrap();
    Layer {
        digest,
        diff_id,
        size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{LayerWriter, Meta};

    #[test]
    fn lookups_follow_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let mk = |f: &dyn Fn(&mut LayerWriter<airlock_image::BlobWriter>)| layer_in(&store, f);
        let m = Meta {
            mode: 0o644,
            ..Default::default()
        };
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        let l1 = mk(&|w| {
            w.dir("usr/bin", m).unwrap();
            w.file("etc/passwd", m, passwd.len() as u64, passwd.as_bytes())
                .unwrap();
            w.file("etc/group", m, group.len() as u64, group.as_bytes())
                .unwrap();
            w.file("opt/implicit/f", m, 0, std::io::empty()).unwrap();
            w.dir("gone", m).unwrap();
        });
        let l2 = mk(&|w| w.whiteout("gone").unwrap());
        let layers = [l1, l2];
        assert!(is_dir(&store, &layers, "usr/bin").unwrap());
        assert!(is_dir(&store, &layers, "opt/implicit").unwrap());
        assert!(!is_dir(&store, &layers, "etc/passwd").unwrap());
        assert!(!is_dir(&store, &layers, "gone").unwrap());
        assert!(!is_dir(&store, &layers, "nope").unwrap());
        assert_eq!(
            read_file(&store, &layers, "etc/group", 100)
                .unwrap()
                .unwrap(),
            group.as_bytes()
        );
        assert_eq!(
            resolve_owner(&store, &layers, "alice").unwrap(),
            (1000, 1001)
        );
        assert_eq!(
            resolve_owner(&store, &layers, "alice:staff").unwrap(),
            (1000, 50)
        );
        assert_eq!(resolve_owner(&store, &layers, "7:8").unwrap(), (7, 8));
        assert!(resolve_owner(&store, &layers, "bob")
            .unwrap_err()
            .contains("/etc/passwd"));
        assert!(resolve_owner(&store, &layers, "alice:nogroup").is_err());
    }
}
