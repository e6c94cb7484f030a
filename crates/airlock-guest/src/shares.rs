//! Builtins over overlay shares: what changed (`share-diff`) and copying out (`copy-out`).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use airlock_proto::{ShareChange, ShareMode};

use crate::setup::{share_lower, share_upper, SHARES};

/// Most entries a diff walks (bounds the work a huge upper layer can cause).
const MAX_ENTRIES: usize = 1_000_000;

fn emit(out: &mut File, kind: &str, path: &Path) -> Result<(), String> {
    let c = ShareChange {
        kind: kind.into(),
        path: path.to_string_lossy().into_owned(),
    };
    let mut line = serde_json::to_vec(&c).map_err(|e| e.to_string())?;
    line.push(b'\n');
    out.write_all(&line).map_err(|e| format!("write: {e}"))
}

fn walk(
    upper: &Path,
    lower: &Path,
    target: &Path,
    out: &mut File,
    budget: &mut usize,
) -> Result<(), String> {
    let rd = std::fs::read_dir(upper).map_err(|e| format!("{}: {e}", upper.display()))?;
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for n in names {
        *budget = budget.checked_sub(1).ok_or("too many changes to list")?;
        let (u, l, t) = (upper.join(&n), lower.join(&n), target.join(&n));
        let Ok(m) = std::fs::symlink_metadata(&u) else {
            continue;
        };
        let in_lower = std::fs::symlink_metadata(&l).ok();
        if m.file_type().is_char_device() && m.rdev() == 0 {
            emit(out, "deleted", &t)?;
        } else if m.is_dir() {
            match &in_lower {
                Some(lm) if lm.is_dir() => {}
                Some(_) => emit(out, "modified", &t)?,
                None => emit(out, "added", &t)?,
            }
            walk(&u, &l, &t, out, budget)?;
        } else {
            emit(
                out,
                if in_lower.is_some() {
                    "modified"
                } else {
                    "added"
                },
                &t,
            )?;
        }
    }
    Ok(())
}

/// Lists the changes in every overlay share as JSON lines.
pub fn diff(out: &mut File) -> Result<(), String> {
    let shares = SHARES.lock().unwrap().clone();
    let mut budget = MAX_ENTRIES;
    for (i, s) in shares.iter().enumerate() {
        if s.mode != ShareMode::Overlay {
            continue;
        }
        let upper = share_upper(i);
        walk(
            Path::new(&upper),
            Path::new(&share_lower(i)),
            Path::new(&s.target),
            out,
            &mut budget,
        )?;
    }
    Ok(())
}

/// Writes `path` (a file or a directory tree, symlinks kept as links) as a tar to `out`.
/// The `copy-in` builtin: unpacks a tar from the host (whose top entry is the copied file or
/// directory) at `dest`, as `docker cp` does: into `dest` when it is an existing directory,
/// else as `dest` (its parent must exist). Owned by root, modes as sent, links kept as links.
pub fn copy_in(r: &mut dyn std::io::Read, dest: &Path) -> Result<(), String> {
    use std::path::Component;
    if !dest.is_absolute() {
        return Err(format!("{}: give an absolute guest path", dest.display()));
    }
    let into_dir = std::fs::metadata(dest).is_ok_and(|m| m.is_dir());
    if !into_dir && !dest.parent().is_some_and(|p| p.is_dir()) {
        return Err(format!(
            "{}: the parent directory does not exist in the sandbox",
            dest.display()
        ));
    }
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    let mut n = 0u64;
    for entry in ar
        .entries()
        .map_err(|e| format!("reading the archive: {e}"))?
    {
        let mut e = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let path = e.path().map_err(|e| format!("bad path: {e}"))?.into_owned();
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("unsafe path {} in the archive", path.display()));
        }
        let mut parts = path.components();
        let top = parts
            .next()
            .map(|c| c.as_os_str().to_owned())
            .unwrap_or_default();
        let rest: std::path::PathBuf = parts.collect();
        let base = if into_dir {
            dest.join(&top)
        } else {
            dest.to_path_buf()
        };
        let target = if rest.as_os_str().is_empty() {
            base
        } else {
            base.join(rest)
        };
        e.unpack(&target)
            .map_err(|err| format!("{}: {err}", target.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err("the archive was empty".into());
    }
    Ok(())
}

pub fn copy_out(path: &str, out: &mut File) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("{path}: give an absolute guest path"));
    }
    let m = std::fs::symlink_metadata(p).map_err(|e| format!("{path}: {e}"))?;
    let name = p
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "root".into());
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let r = if m.is_dir() {
        b.append_dir_all(&name, p)
    } else {
        b.append_path_with_name(p, &name)
    };
    r.and_then(|_| b.finish())
        .map_err(|e| format!("{path}: {e}"))
}
