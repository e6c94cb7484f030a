//! The `root-diff` builtin: the root overlay's upper directory (everything a command changed
//! in the sandbox's root) written as an OCI layer tar, for `airlock build`'s RUN steps.
//!
//! Overlay whiteouts (character devices 0/0) become `.wh.NAME` entries, opaque directories
//! (`trusted.overlay.opaque=y`) get a `.wh..wh..opq` entry, hardlinks inside the diff stay
//! hardlinks, overlay's own xattrs are never copied. Paths the agent itself writes (mount
//! points, resolv.conf, the injected CA) are left out. A directory appears only when
//! something below it does, or when it is opaque or new and empty: overlay copies a
//! directory up whenever a file in it changes, and the agent makes some (`/etc/ssl/certs`)
//! for its own files; a layer should carry neither on its own.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Most entries written (bounds the work a huge upper layer can cause).
const MAX_ENTRIES: usize = 2_000_000;

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn is_opaque(path: &Path) -> bool {
    xattr(path, "trusted.overlay.opaque").is_some_and(|v| v == b"y")
        || xattr(path, "user.overlay.opaque").is_some_and(|v| v == b"y")
}

/// Copied up from the lower layer (overlay records where it came from), rather than new.
fn copied_up(path: &Path) -> bool {
    xattr(path, "trusted.overlay.origin").is_some()
}

struct Writer<'a, W: Write> {
    tar: tar::Builder<&'a mut W>,
    /// Directories seen but not written yet (written once something below them is).
    pending: Vec<(PathBuf, std::fs::Metadata)>,
    written_dirs: usize,
    links: HashMap<(u64, u64), PathBuf>,
    budget: usize,
    count: u64,
}

impl<W: Write> Writer<'_, W> {
    fn header(meta: &std::fs::Metadata) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        h
    }

    fn tick(&mut self) -> Result<(), String> {
        self.budget = self.budget.checked_sub(1).ok_or("too many changed files")?;
        self.count += 1;
        Ok(())
    }

    /// Writes the directories still pending above the next entry.
    fn flush_dirs(&mut self) -> Result<(), String> {
        while self.written_dirs < self.pending.len() {
            let (rel, meta) = self.pending[self.written_dirs].clone();
            self.written_dirs += 1;
            self.tick()?;
            let mut h = Self::header(&meta);
            h.set_size(0);
            self.tar
                .append_data(&mut h, dir_name(&rel), std::io::empty())
                .map_err(|e| format!("{}: {e}", rel.display()))?;
        }
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, name: &OsStr) -> Result<(), String> {
        self.flush_dirs()?;
        let mut wh = std::ffi::OsString::from(".wh.");
        wh.push(name);
        let p = rel.parent().unwrap_or(Path::new("")).join(wh);
        self.marker(&p, rel)
    }

    /// An empty root-owned entry at `path`: a whiteout or an opaque-directory marker
    /// (errors name `rel`, the upper-dir entry it stands for).
    fn marker(&mut self, path: &Path, rel: &Path) -> Result<(), String> {
        self.tick()?;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        h.set_mtime(0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .map_err(|e| format!("{}: {e}", rel.display()))
    }

    fn entry(&mut self, abs: &Path, rel: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
        self.flush_dirs()?;
        self.tick()?;
        let err = |e: std::io::Error| format!("{}: {e}", rel.display());
        let ft = meta.file_type();
        let mut h = Self::header(meta);
        if ft.is_file() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                return self.tar.append_link(&mut h, rel, first).map_err(err);
            }
            self.links.insert(key, rel.to_path_buf());
        }
        if ft.is_file() {
            let f = std::fs::File::open(abs).map_err(err)?;
            // The size the header says is what is sent: a file still growing is cut there.
            self.tar
                .append_data(&mut h, rel, std::io::Read::take(f, meta.len()))
                .map_err(err)
        } else if ft.is_symlink() {
            let target = std::fs::read_link(abs).map_err(err)?;
            h.set_size(0);
            self.tar.append_link(&mut h, rel, target).map_err(err)
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_size(0);
            self.tar
                .append_data(&mut h, rel, std::io::empty())
                .map_err(err)
        } else {
            // Sockets have no place in an image.
            Ok(())
        }
    }

    fn walk(&mut self, upper: &Path, rel: &Path, exclude: &[PathBuf]) -> Result<(), String> {
        let dir = upper.join(rel);
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            if exclude.iter().any(|x| r == *x) {
                continue;
            }
            let abs = upper.join(&r);
            let Ok(m) = std::fs::symlink_metadata(&abs) else {
                continue;
            };
            let ft = m.file_type();
            if ft.is_char_device() && m.rdev() == 0 {
                self.whiteout(&r, &n)?;
            } else if ft.is_dir() {
                let depth = self.pending.len();
                self.pending.push((r.clone(), m));
                if is_opaque(&abs) {
                    self.flush_dirs()?;
                    self.marker(&r.join(".wh..wh..opq"), &r)?;
                }
                self.walk(upper, &r, exclude)?;
                // A new, empty directory is a change of its own (`mkdir`); one holding only
                // what is left out (the agent's files) is not.
                let empty = std::fs::read_dir(&abs).map_or(false, |mut d| d.next().is_none());
                if self.written_dirs <= depth && empty && !copied_up(&abs) {
                    self.flush_dirs()?;
                }
                self.pending.truncate(depth);
                self.written_dirs = self.written_dirs.min(depth);
            } else {
                self.entry(&abs, &r, &m)?;
            }
        }
        Ok(())
    }
}

fn dir_name(rel: &Path) -> PathBuf {
    let mut s = rel.as_os_str().to_os_string();
    s.push("/");
    PathBuf::from(s)
}

/// Writes the overlay upper directory `upper` as a layer tar to `out`, leaving out the
/// `exclude`d paths (relative to the root, e.g. `etc/resolv.conf`; a directory's whole tree
/// goes). Returns the number of entries written.
pub fn write_diff(upper: &Path, exclude: &[&str], out: &mut impl Write) -> Result<u64, String> {
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .map(|x| PathBuf::from(x.trim_start_matches('/')))
        .collect();
    let mut w = Writer {
        tar: tar::Builder::new(out),
        pending: Vec::new(),
        written_dirs: 0,
        links: HashMap::new(),
        budget: MAX_ENTRIES,
        count: 0,
    };
    w.tar.mode(tar::HeaderMode::Complete);
    w.tar.follow_symlinks(false);
    w.walk(upper, Path::new(""), &exclude)?;
    let n = w.count;
    w.tar.finish().map_err(|e| format!("write: {e}"))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect()
    }

    #[test]
    fn diff_of_a_plain_tree_with_exclusions_and_hardlinks() {
        let d = tempfile::tempdir().unwrap();
        let u = d.path();
        std::fs::create_dir_all(u.join("etc")).unwrap();
        std::fs::write(u.join("etc/resolv.conf"), "nameserver 1.1.1.1").unwrap();
        std::fs::write(u.join("etc/app.conf"), "x=1").unwrap();
        std::fs::create_dir_all(u.join("proc")).unwrap();
        std::fs::create_dir_all(u.join("only-excluded")).unwrap();
        std::fs::write(u.join("only-excluded/x"), "agent's").unwrap();
        std::fs::create_dir_all(u.join("empty")).unwrap();
        std::fs::write(u.join("a"), "data").unwrap();
        std::fs::hard_link(u.join("a"), u.join("b")).unwrap();
        std::os::unix::fs::symlink("a", u.join("c")).unwrap();
        let mut out = Vec::new();
        write_diff(
            u,
            &["proc", "/etc/resolv.conf", "only-excluded/x"],
            &mut out,
        )
        .unwrap();
        let n = names(&out);
        let paths: Vec<&str> = n.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["a", "b", "c", "empty/", "etc/", "etc/app.conf"]);
        assert_eq!(n[1].1, tar::EntryType::Link);
        assert_eq!(n[2].1, tar::EntryType::Symlink);
        let mut a = tar::Archive::new(&out[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        assert_eq!(s, "data");
    }
}
