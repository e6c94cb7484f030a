//! Writing OCI layer tars deterministically (entries in the order given, callers sort;
//! ownership and modes explicit; gzip without a timestamp), with the uncompressed digest
//! (`diff_id`) and the blob digest computed on the way; and re-writing an untrusted tar (a
//! RUN step's diff from the guest) through the same writer, checking every path.

use std::io::{self, Read, Write};
use std::path::{Component, Path};

use sha2::{Digest, Sha256};

/// Most entries accepted in a layer from the guest.
pub const MAX_ENTRIES: u64 = 2_000_000;

/// The tar stream hashed (diff_id) on its way into the gzip encoder.
struct DiffHasher<W: Write> {
    inner: flate2::write::GzEncoder<W>,
    hasher: Sha256,
}

impl<W: Write> Write for DiffHasher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one gzip-compressed layer tar into `W`.
pub struct LayerWriter<W: Write> {
    tar: tar::Builder<DiffHasher<W>>,
    entries: u64,
}

/// Ownership and time of an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

fn header(kind: tar::EntryType, m: Meta, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(m.mode & 0o7777);
    h.set_uid(m.uid);
    h.set_gid(m.gid);
    h.set_mtime(m.mtime);
    h.set_size(size);
    h
}

impl<W: Write> LayerWriter<W> {
    /// A layer written to `out` (gzip, default level, no name or time in the gzip header).
    pub fn new(out: W) -> Self {
        let gz = flate2::GzBuilder::new().write(out, flate2::Compression::default());
        LayerWriter {
            tar: tar::Builder::new(DiffHasher {
                inner: gz,
                hasher: Sha256::new(),
            }),
            entries: 0,
        }
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn count(&mut self) {
        self.entries += 1;
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, m: Meta) -> io::Result<()> {
        self.count();
        let mut h = header(tar::EntryType::Directory, m, 0);
        self.tar.append_data(
            &mut h,
            format!("{}/", path.trim_end_matches('/')),
            io::empty(),
        )
    }

    /// A regular file of `size` bytes read from `data` (exactly `size` bytes are written:
    /// shorter data is an error, longer is cut).
    pub fn file(&mut self, path: &str, m: Meta, size: u64, data: impl Read) -> io::Result<()> {
        self.count();
        let mut h = header(tar::EntryType::Regular, m, size);
        let mut r = data.take(size);
        let mut counted = CountingReader {
            inner: &mut r,
            n: 0,
        };
        self.tar.append_data(&mut h, path, &mut counted)?;
        if counted.n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: file shrank while being read"),
            ));
        }
        Ok(())
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &Path, m: Meta) -> io::Result<()> {
        self.count();
        let mut h = header(tar::EntryType::Symlink, Meta { mode: 0o777, ..m }, 0);
        self.tar.append_link(&mut h, path, target)
    }

    /// A hard link to `target` (an earlier entry's path).
    pub fn hardlink(&mut self, path: &str, target: &str, m: Meta) -> io::Result<()> {
        self.count();
        let mut h = header(tar::EntryType::Link, m, 0);
        self.tar.append_link(&mut h, path, target)
    }

    /// A device node or fifo.
    pub fn special(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        m: Meta,
        dev: (u32, u32),
    ) -> io::Result<()> {
        self.count();
        let mut h = header(kind, m, 0);
        h.set_device_major(dev.0)?;
        h.set_device_minor(dev.1)?;
        self.tar.append_data(&mut h, path, io::empty())
    }

    /// A whiteout: hides `path` of lower layers.
    pub fn whiteout(&mut self, path: &str) -> io::Result<()> {
        let (parent, name) = match path.rsplit_once('/') {
            Some((p, n)) => (format!("{p}/"), n),
            None => (String::new(), path),
        };
        self.count();
        let mut h = header(tar::EntryType::Regular, Meta::default(), 0);
        self.tar
            .append_data(&mut h, format!("{parent}.wh.{name}"), io::empty())
    }

    /// Ends the tar and the gzip stream; returns the output and the layer's diff_id.
    pub fn finish(self) -> io::Result<(W, String)> {
        let hashed = self.tar.into_inner()?;
        let diff_id = format!("sha256:{}", hex::encode(hashed.hasher.finalize()));
        let out = hashed.inner.finish()?;
        Ok((out, diff_id))
    }
}

struct CountingReader<'a, R: Read> {
    inner: &'a mut R,
    n: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// A layer path in canonical form: relative, no `.`/`..`/empty components, UTF-8, no NUL.
pub fn clean_path(raw: &str) -> Result<String, String> {
    if raw.contains('\0') {
        return Err(format!("path {raw:?} contains NUL"));
    }
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(n) => parts.push(n.to_str().ok_or("path is not UTF-8")?),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(format!("path {raw:?} contains '..'")),
            Component::Prefix(_) => return Err(format!("bad path {raw:?}")),
        }
    }
    Ok(parts.join("/"))
}

/// Copies the layer tar `input` (from the guest: untrusted) into `out`, entry by entry:
/// every path and hardlink target must be a clean relative path, only files, directories,
/// links, devices and fifos pass (anything else is dropped), at most [`MAX_ENTRIES`].
/// Returns the number of entries written.
pub fn rewrite_untrusted<W: Write>(
    input: impl Read,
    out: &mut LayerWriter<W>,
) -> Result<u64, String> {
    rewrite_untrusted_under(input, out, "")
}

/// [`rewrite_untrusted`] with every path (and hardlink target) placed under `prefix` (a
/// clean layer path; `ADD archive.tar /dest/`).
pub fn rewrite_untrusted_under<W: Write>(
    input: impl Read,
    out: &mut LayerWriter<W>,
    prefix: &str,
) -> Result<u64, String> {
    let under = |p: String| {
        if prefix.is_empty() || p.is_empty() {
            p
        } else {
            format!("{prefix}/{p}")
        }
    };
    let mut ar = tar::Archive::new(input);
    let bad = |e: io::Error| format!("malformed tar from the guest: {e}");
    let mut n = 0u64;
    for entry in ar.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        n += 1;
        if n > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} changed files"));
        }
        let raw = String::from_utf8(e.path_bytes().into_owned())
            .map_err(|_| "a changed file's name is not UTF-8 (not supported)".to_string())?;
        let path = under(clean_path(&raw)?);
        if path.is_empty() {
            continue;
        }
        let h = e.header();
        // Unreadable metadata fields (blank in some writers' special entries) read as 0.
        let m = Meta {
            mode: h.mode().unwrap_or(0o644),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            mtime: h.mtime().unwrap_or(0),
        };
        let kind = h.entry_type();
        let io_err = |e: io::Error| format!("writing layer: {e}");
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = h.size().map_err(bad)?;
                out.file(&path, m, size, &mut e).map_err(io_err)?
            }
            tar::EntryType::Directory => out.dir(&path, m).map_err(io_err)?,
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(bad)?
                    .ok_or("symlink without a target")?
                    .into_owned();
                out.symlink(&path, &target, m).map_err(io_err)?
            }
            tar::EntryType::Link => {
                let raw = e
                    .link_name_bytes()
                    .ok_or("hardlink without a target")?
                    .into_owned();
                let target = clean_path(
                    std::str::from_utf8(&raw).map_err(|_| "hardlink target is not UTF-8")?,
                )?;
                if target.is_empty() {
                    return Err(format!("hardlink {path} has no target"));
                }
                let target = under(target);
                out.hardlink(&path, &target, m).map_err(io_err)?
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let dev = (
                    h.device_major().ok().flatten().unwrap_or(0),
                    h.device_minor().ok().flatten().unwrap_or(0),
                );
                out.special(&path, kind, m, dev).map_err(io_err)?
            }
            _ => continue,
        }
    }
    Ok(out.entries())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(gz: &[u8]) -> Vec<(String, tar::EntryType, u32, u64, String)> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut s = String::new();
                let p = e.path().unwrap().display().to_string();
                let (k, mode, uid) = (
                    e.header().entry_type(),
                    e.header().mode().unwrap(),
                    e.header().uid().unwrap(),
                );
                if k == tar::EntryType::Regular {
                    e.read_to_string(&mut s).unwrap();
                } else if let Ok(Some(l)) = e.link_name() {
                    s = l.display().to_string();
                }
                (p, k, mode, uid, s)
            })
            .collect()
    }

    fn sample() -> (Vec<u8>, String) {
        let mut w = LayerWriter::new(Vec::new());
        let m = Meta {
            mode: 0o755,
            uid: 1000,
            gid: 1000,
            mtime: 5,
        };
        w.dir("app", m).unwrap();
        w.file("app/a.txt", Meta { mode: 0o4644, ..m }, 5, &b"hello"[..])
            .unwrap();
        w.symlink("app/l", Path::new("a.txt"), m).unwrap();
        w.hardlink("app/h", "app/a.txt", m).unwrap();
        w.whiteout("etc/gone").unwrap();
        w.whiteout("top").unwrap();
        let long = format!("app/{}", "x".repeat(150));
        w.file(&long, m, 0, io::empty()).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn layers_are_deterministic_and_say_what_was_written() {
        let (a, da) = sample();
        let (b, db) = sample();
        assert_eq!(a, b, "same entries, same bytes");
        assert_eq!(da, db);
        // diff_id is the digest of the uncompressed tar.
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&a[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(da, format!("sha256:{}", hex::encode(Sha256::digest(&raw))));
        let e = entries(&a);
        assert_eq!(e[0].0, "app/");
        assert_eq!((e[1].2, e[1].3, e[1].4.as_str()), (0o4644, 1000, "hello"));
        assert_eq!(
            (e[2].1, e[2].4.as_str()),
            (tar::EntryType::Symlink, "a.txt")
        );
        assert_eq!(
            (e[3].1, e[3].4.as_str()),
            (tar::EntryType::Link, "app/a.txt")
        );
        assert_eq!(e[4].0, "etc/.wh.gone");
        assert_eq!(e[5].0, ".wh.top");
        assert_eq!(e[6].0.len(), 154, "long names survive");
    }

    #[test]
    fn short_data_is_an_error() {
        let mut w = LayerWriter::new(Vec::new());
        assert!(w.file("f", Meta::default(), 10, &b"abc"[..]).is_err());
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path("/a/./b/").unwrap(), "a/b");
        assert_eq!(clean_path("./").unwrap(), "");
        assert!(clean_path("a/../../etc").is_err());
        assert!(clean_path("a\0b").is_err());
    }

    fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, k, d) in entries {
            let mut h = tar::Header::new_old();
            // Write the name bytes directly so hostile names get through the builder.
            h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
            h.set_entry_type(*k);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(if *k == tar::EntryType::Regular {
                d.len() as u64
            } else {
                0
            });
            if *k == tar::EntryType::Link || *k == tar::EntryType::Symlink {
                h.as_old_mut().linkname[..d.len()].copy_from_slice(d.as_bytes());
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            if *k == tar::EntryType::Regular {
                out.extend_from_slice(d.as_bytes());
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn untrusted_tars_are_checked() {
        use tar::EntryType::*;
        let ok = raw_tar(&[
            ("/abs/f", Regular, "x"),
            ("./d/", Directory, ""),
            ("s", Symlink, "/etc/passwd"),
            ("h", Link, "/abs/f"),
        ]);
        let mut w = LayerWriter::new(Vec::new());
        assert_eq!(rewrite_untrusted(&ok[..], &mut w).unwrap(), 4);
        let (gz, _) = w.finish().unwrap();
        let e = entries(&gz);
        assert_eq!(e[0].0, "abs/f");
        assert_eq!(e[1].0, "d/");
        assert_eq!(
            e[2].4, "/etc/passwd",
            "symlink targets may point anywhere (resolved in the guest)"
        );
        assert_eq!(e[3].4, "abs/f");
        for bad in [
            raw_tar(&[("../escape", Regular, "x")]),
            raw_tar(&[("a/../../b", Regular, "x")]),
            raw_tar(&[("h", Link, "../../etc/shadow")]),
            raw_tar(&[("h", Link, "")]),
        ] {
            let mut w = LayerWriter::new(Vec::new());
            assert!(rewrite_untrusted(&bad[..], &mut w).is_err());
        }
        let mut w = LayerWriter::new(Vec::new());
        assert!(
            rewrite_untrusted(&b"not a tar at all, just some bytes"[..], &mut w).is_err()
                || w.entries() == 0
        );
    }
}
