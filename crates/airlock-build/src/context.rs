//! The build context: a host directory, `.dockerignore` applied, every source path kept
//! inside it (lexically and through symlinks).

use std::fs;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};

use crate::error::{BuildError, Result};

/// Most entries one COPY may take from the context.
const MAX_ENTRIES: usize = 1_000_000;

/// `.dockerignore` rules, Docker's semantics: patterns relative to the context root
/// (a leading `/` is ignored), `*`/`?`/`[...]` within one path component, `**` across
/// components, `!` re-includes; the last matching rule wins, and a rule matching a directory
/// covers everything below it.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    rules: Vec<(GlobMatcher, bool)>,
    has_exceptions: bool,
}

fn glob(pattern: &str) -> std::result::Result<GlobMatcher, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g: Glob| g.compile_matcher())
}

/// Lexically cleans a relative path: `.` and empty parts dropped, `..` resolved; `None` if
/// it climbs out.
pub fn clean_rel(p: &str) -> Option<String> {
    airlock_image::clean_relative(p)
}

impl Ignore {
    /// Parses `.dockerignore` text.
    pub fn parse(text: &str) -> std::result::Result<Ignore, String> {
        let mut ig = Ignore::default();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let (exception, pat) = match t.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, t),
            };
            // Docker cleans the pattern like a path; one climbing out matches nothing.
            let Some(clean) = clean_rel(pat) else {
                continue;
            };
            if clean.is_empty() {
                continue;
            }
            let m = glob(&clean)
                .map_err(|e| format!(".dockerignore line {}: bad pattern {pat:?}: {e}", i + 1))?;
            ig.has_exceptions |= exception;
            ig.rules.push((m, !exception));
        }
        Ok(ig)
    }

    /// Whether the context path `rel` (`a/b/c`, no leading `/`) is left out.
    pub fn excluded(&self, rel: &str) -> bool {
        let mut result = false;
        for (m, exclude) in &self.rules {
            let mut hit = m.is_match(rel);
            if !hit {
                let mut p = rel;
                while let Some((parent, _)) = p.rsplit_once('/') {
                    if m.is_match(parent) {
                        hit = true;
                        break;
                    }
                    p = parent;
                }
            }
            if hit {
                result = *exclude;
            }
        }
        result
    }
}

/// What one context entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file of this size.
    File(u64),
    /// A directory.
    Dir,
    /// A symlink with this target.
    Symlink(PathBuf),
}

/// One file, directory or link taken from the context.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path on the host.
    pub host: PathBuf,
    /// Path below the source it was found from (`""` for the source itself).
    pub below: String,
    /// What it is.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (seconds).
    pub mtime: u64,
}

/// One COPY source, resolved.
#[derive(Debug, Clone)]
pub struct Source {
    /// Context-relative path.
    pub rel: String,
    /// The source itself and, for a directory, everything below it (not ignored), sorted.
    pub entries: Vec<Entry>,
    /// Whether the source is a directory (its contents are copied, not itself).
    pub is_dir: bool,
}

/// A build context directory.
#[derive(Debug, Clone)]
pub struct Context {
    root: PathBuf,
    ignore: Ignore,
}

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

impl Context {
    /// Opens `dir` and reads its `.dockerignore`.
    pub fn open(dir: &Path) -> Result<Context> {
        let root = fs::canonicalize(dir).map_err(|e| {
            BuildError::Context(format!(
                "build context {}: {e}: give an existing directory",
                dir.display()
            ))
        })?;
        if !root.is_dir() {
            return Err(BuildError::Context(format!(
                "build context {} is not a directory",
                dir.display()
            )));
        }
        let ignore = match fs::read_to_string(root.join(".dockerignore")) {
            Ok(t) => Ignore::parse(&t).map_err(BuildError::Context)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ignore::default(),
            Err(e) => return Err(BuildError::io(".dockerignore", e)),
        };
        Ok(Context { root, ignore })
    }

    /// The context directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves one COPY source (a path or a pattern), refusing anything outside the
    /// context or excluded by `.dockerignore`.
    pub fn resolve(&self, src: &str) -> Result<Vec<Source>> {
        let rel = clean_rel(src.trim_start_matches('/')).ok_or_else(|| {
            BuildError::Context(format!(
                "COPY {src}: the path is outside the build context; copy only files below {}",
                self.root.display()
            ))
        })?;
        if has_meta(&rel) {
            let m = glob(&rel)
                .map_err(|e| BuildError::Context(format!("COPY {src}: bad pattern: {e}")))?;
            let mut hits = Vec::new();
            self.walk("", &mut |r, _| {
                if m.is_match(r) {
                    hits.push(r.to_string());
                }
            })?;
            // A match inside a matched directory is already covered by it.
            hits.sort();
            let mut tops: Vec<String> = Vec::new();
            for h in hits {
                if !tops.iter().any(|t| h.starts_with(&format!("{t}/"))) {
                    tops.push(h);
                }
            }
            if tops.is_empty() {
                return Err(BuildError::Context(format!(
                    "COPY {src}: no file in the build context matches (or .dockerignore excludes them)"
                )));
            }
            return tops.iter().map(|t| self.source(t, src)).collect();
        }
        Ok(vec![self.source(&rel, src)?])
    }

    fn source(&self, rel: &str, src: &str) -> Result<Source> {
        if !rel.is_empty() && self.ignore.excluded(rel) {
            return Err(BuildError::Context(format!(
                "COPY {src}: excluded by .dockerignore; remove the matching line to copy it"
            )));
        }
        let host = self.root.join(rel);
        // Every parent must resolve inside the context (a symlinked directory may not lead out).
        if let Some(parent) = host.parent().filter(|_| !rel.is_empty()) {
            match fs::canonicalize(parent) {
                Ok(p) if p.starts_with(&self.root) => {}
                Ok(_) => {
                    return Err(BuildError::Context(format!(
                        "COPY {src}: leads outside the build context through a symlink"
                    )))
                }
                Err(_) => return Err(not_found(src)),
            }
        }
        let meta = fs::symlink_metadata(&host).map_err(|_| not_found(src))?;
        let top = entry(&host, String::new(), &meta)?;
        let is_dir = meta.is_dir();
        let mut entries = vec![top];
        if is_dir {
            let mut n = 0usize;
            let mut err = None;
            self.walk(rel, &mut |r, m| {
                n += 1;
                if err.is_some() {
                    return;
                }
                if n > MAX_ENTRIES {
                    err = Some(BuildError::Context(format!(
                        "COPY {src}: more than {MAX_ENTRIES} files"
                    )));
                    return;
                }
                let below = if rel.is_empty() {
                    r
                } else {
                    &r[rel.len() + 1..]
                };
                match entry(&self.root.join(r), below.to_string(), m) {
                    Ok(e) => entries.push(e),
                    Err(e) => err = Some(e),
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(Source {
            rel: rel.to_string(),
            entries,
            is_dir,
        })
    }

    /// Calls `f` for every non-ignored entry below context path `rel`, sorted, depth first;
    /// never follows symlinks.
    fn walk(&self, rel: &str, f: &mut dyn FnMut(&str, &fs::Metadata)) -> Result<()> {
        let dir = self.root.join(rel);
        let rd =
            fs::read_dir(&dir).map_err(|e| BuildError::io(format!("read {}", dir.display()), e))?;
        let mut names: Vec<String> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| BuildError::io(format!("read {}", dir.display()), e))?;
            let name = e.file_name().into_string().map_err(|n| {
                BuildError::Context(format!(
                    "{}: file name {n:?} is not UTF-8 (not supported)",
                    dir.display()
                ))
            })?;
            names.push(name);
        }
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            let Ok(m) = fs::symlink_metadata(self.root.join(&r)) else {
                continue;
            };
            let excluded = self.ignore.excluded(&r);
            if !excluded {
                f(&r, &m);
            }
            // An excluded directory may still hold re-included files.
            if m.is_dir() && (!excluded || self.ignore.has_exceptions) {
                self.walk(&r, f)?;
            }
        }
        Ok(())
    }
}

fn not_found(src: &str) -> BuildError {
    BuildError::Context(format!(
        "COPY {src}: no such file or directory in the build context"
    ))
}

fn entry(host: &Path, below: String, m: &fs::Metadata) -> Result<Entry> {
    use std::os::unix::fs::MetadataExt;
    let kind = if m.is_dir() {
        Kind::Dir
    } else if m.file_type().is_symlink() {
        Kind::Symlink(
            fs::read_link(host).map_err(|e| BuildError::io(host.display().to_string(), e))?,
        )
    } else if m.is_file() {
        Kind::File(m.len())
    } else {
        return Err(BuildError::Context(format!(
            "{}: only files, directories and symlinks can be copied",
            host.display()
        )));
    };
    Ok(Entry {
        host: host.to_path_buf(),
        below,
        kind,
        mode: m.mode() & 0o7777,
        mtime: m.mtime().max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_semantics() {
        let ig = Ignore::parse(
            "# comment\n\n*.log\n/build\nsecret/**\n!secret/keep.txt\nnode_modules\n!node_modules/ok\n**/*.tmp\n../nothing\n",
        )
        .unwrap();
        assert!(ig.excluded("a.log"));
        assert!(!ig.excluded("sub/a.log"), "* stays within a component");
        assert!(ig.excluded("build"));
        assert!(
            ig.excluded("build/x/y"),
            "a matched directory covers its tree"
        );
        assert!(ig.excluded("secret/a"));
        assert!(!ig.excluded("secret/keep.txt"));
        assert!(ig.excluded("node_modules/x"));
        assert!(!ig.excluded("node_modules/ok"));
        assert!(
            !ig.excluded("node_modules/ok/inner"),
            "re-included directory"
        );
        assert!(ig.excluded("deep/er/x.tmp"));
        assert!(ig.excluded("x.tmp"));
        assert!(!ig.excluded("keep.txt"));
        assert!(Ignore::parse("[").is_err());
    }

    #[test]
    fn clean_rel_confines() {
        assert_eq!(clean_rel("a/./b//c").as_deref(), Some("a/b/c"));
        assert_eq!(clean_rel("a/../b").as_deref(), Some("b"));
        assert_eq!(clean_rel(".").as_deref(), Some(""));
        assert_eq!(clean_rel("../x"), None);
        assert_eq!(clean_rel("a/../../x"), None);
    }

    #[test]
    fn sources_resolve_inside_the_context_only() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("ctx");
        fs::create_dir_all(c.join("dir/sub")).unwrap();
        fs::write(c.join("a.txt"), "a").unwrap();
        fs::write(c.join("b.txt"), "b").unwrap();
        fs::write(c.join("x.log"), "log").unwrap();
        fs::write(c.join("dir/sub/f"), "f").unwrap();
        fs::write(c.join("dir/skip.log"), "no").unwrap();
        fs::write(d.path().join("outside"), "secret").unwrap();
        std::os::unix::fs::symlink(d.path(), c.join("up")).unwrap();
        std::os::unix::fs::symlink("a.txt", c.join("link")).unwrap();
        fs::write(c.join(".dockerignore"), "*.log\n**/*.log\n").unwrap();
        let ctx = Context::open(&c).unwrap();

        let s = ctx.resolve("a.txt").unwrap();
        assert_eq!(s[0].entries[0].kind, Kind::File(1));
        let s = ctx.resolve("dir").unwrap();
        assert!(s[0].is_dir);
        let below: Vec<&str> = s[0].entries.iter().map(|e| e.below.as_str()).collect();
        assert_eq!(below, ["", "sub", "sub/f"], "ignored file left out");
        let s = ctx.resolve("*.txt").unwrap();
        assert_eq!(
            s.iter().map(|s| s.rel.as_str()).collect::<Vec<_>>(),
            ["a.txt", "b.txt"]
        );
        let s = ctx.resolve("link").unwrap();
        assert_eq!(s[0].entries[0].kind, Kind::Symlink("a.txt".into()));
        let s = ctx.resolve(".").unwrap();
        assert!(s[0].entries.iter().all(|e| !e.below.ends_with(".log")));

        for (src, msg) in [
            ("../outside", "outside the build context"),
            ("dir/../../outside", "outside the build context"),
            ("up/outside", "symlink"),
            ("missing", "no such file"),
            ("x.log", ".dockerignore"),
            ("*.nope", "no file"),
        ] {
            let e = ctx.resolve(src).unwrap_err().to_string();
            assert!(e.contains(msg), "{src}: {e}");
        }
    }
}
