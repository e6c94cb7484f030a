//! File rules: which guest operations on which paths are denied or audited.
//!
//! A rule is `ACTION OPS GLOB`, e.g. `deny write,create,remove /workspace/.git/hooks/**`:
//! ACTION is `deny` (the guest gets EACCES and an event is logged) or `audit` (allowed, but
//! logged); OPS is a comma list of [`Op`] names; GLOB matches guest paths (`*` stays within one
//! component, `**` crosses them). The first matching `deny` wins over any `audit`.
//!
//! Rules hold by what a path *is*, whatever it was called when the operation came:
//! - `write` covers every operation that changes content or metadata: write and truncate,
//!   create, mkdir, mknod, symlink, link, remove, rename in and out, chmod, chown and
//!   timestamps (the narrower names stay usable on their own).
//! - An operation that moves or removes a whole directory (rename of it or over it, rmdir) is
//!   refused when a rule denying that operation could match anything *below* the directory,
//!   old name or new: renaming `/w/.git` away under `deny write /w/.git/**` is refused, since
//!   afterwards its contents would no longer be called `/w/.git/...`.

use std::fmt;
use std::str::FromStr;

use globset::{GlobBuilder, GlobMatcher};

/// An operation a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Open a file for reading.
    Read,
    /// Open a file for writing, truncate it or change its size.
    Write,
    /// Create a file, device node, symlink or hard link.
    Create,
    /// Unlink a file or remove a directory.
    Remove,
    /// Rename (checked on both the old and the new path).
    Rename,
    /// Make a directory.
    Mkdir,
    /// Change permission bits.
    Chmod,
    /// Change owner or group.
    Chown,
    /// List a directory.
    List,
}

impl Op {
    /// Every operation, in bit order.
    pub const ALL: [Op; 9] = [
        Op::Read,
        Op::Write,
        Op::Create,
        Op::Remove,
        Op::Rename,
        Op::Mkdir,
        Op::Chmod,
        Op::Chown,
        Op::List,
    ];

    /// The name used in rules and events.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Create => "create",
            Op::Remove => "remove",
            Op::Rename => "rename",
            Op::Mkdir => "mkdir",
            Op::Chmod => "chmod",
            Op::Chown => "chown",
            Op::List => "list",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// Whether the operation changes content or metadata (and so falls under `write`).
    pub fn modifies(self) -> bool {
        !matches!(self, Op::Read | Op::List)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Op, String> {
        Op::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| {
            let names: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
            format!(
                "unknown operation {s:?} (one of: {}, all)",
                names.join(", ")
            )
        })
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refuse with EACCES and log an event.
    Deny,
    /// Allow and log an event.
    Audit,
}

/// One parsed rule.
#[derive(Debug, Clone)]
pub struct FsRule {
    /// Deny or audit.
    pub action: Action,
    /// Operations it covers.
    pub ops: Vec<Op>,
    /// Glob over guest paths.
    pub glob: String,
    matcher: GlobMatcher,
    /// The glob split at `/`: `None` for a `**` component (or one that does not compile on
    /// its own, which is then treated as `**`: wider, never narrower).
    components: Vec<Option<GlobMatcher>>,
    bits: u16,
}

impl FsRule {
    fn names(&self, op: Op) -> bool {
        self.bits & op.bit() != 0 || (op.modifies() && self.bits & Op::Write.bit() != 0)
    }

    fn covers(&self, op: Op, path: &std::path::Path) -> bool {
        self.names(op) && self.matcher.is_match(path)
    }

    /// Whether the glob could match some path strictly below `dir` (a guest path, `/`-separated
    /// bytes). Component by component: a `**` before `dir` is used up could reach anything
    /// below it; otherwise every component of `dir` must match its glob component and the
    /// glob must go on past `dir`.
    fn could_match_below(&self, dir: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let parts = dir.split(|b| *b == b'/').filter(|p| !p.is_empty());
        let mut globs = self.components.iter();
        for part in parts {
            match globs.next() {
                None => return false,
                Some(None) => return true,
                Some(Some(m)) => {
                    if !m.is_match(std::path::Path::new(std::ffi::OsStr::from_bytes(part))) {
                        return false;
                    }
                }
            }
        }
        globs.next().is_some()
    }
}

fn glob_matcher(glob: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()?
        .compile_matcher())
}

impl fmt::Display for FsRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Deny => "deny",
            Action::Audit => "audit",
        };
        let ops: Vec<_> = self.ops.iter().map(|o| o.name()).collect();
        write!(f, "{action} {} {}", ops.join(","), self.glob)
    }
}

impl FromStr for FsRule {
    type Err = String;
    fn from_str(s: &str) -> Result<FsRule, String> {
        const USAGE: &str = "expected 'deny|audit OPS GLOB', e.g. 'deny write,create,remove /workspace/.git/hooks/**'";
        let mut it = s.split_whitespace();
        let (Some(action), Some(ops), Some(glob), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(format!("file rule {s:?}: {USAGE}"));
        };
        let action = match action {
            "deny" => Action::Deny,
            "audit" => Action::Audit,
            other => {
                return Err(format!(
                    "file rule {s:?}: unknown action {other:?}; {USAGE}"
                ))
            }
        };
        let mut list = Vec::new();
        for o in ops.split(',') {
            if o == "all" {
                list.extend(Op::ALL);
            } else {
                list.push(
                    o.parse::<Op>()
                        .map_err(|e| format!("file rule {s:?}: {e}"))?,
                );
            }
        }
        if !glob.starts_with('/') {
            return Err(format!(
                "file rule {s:?}: the glob must be an absolute guest path (like /workspace/**)"
            ));
        }
        let matcher = glob_matcher(glob).map_err(|e| format!("file rule {s:?}: bad glob: {e}"))?;
        let components = glob
            .split('/')
            .filter(|c| !c.is_empty())
            .map(|c| match c {
                "**" => None,
                c => glob_matcher(c).ok(),
            })
            .collect();
        let bits = list.iter().fold(0, |b, o| b | o.bit());
        Ok(FsRule {
            action,
            ops: list,
            glob: glob.to_string(),
            matcher,
            components,
            bits,
        })
    }
}

/// What the rules say about one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, nothing to log.
    Allow,
    /// Allowed, log it.
    Audit,
    /// Refused, log it.
    Deny,
}

/// An ordered set of rules.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<FsRule>,
}

impl RuleSet {
    /// A set of rules.
    pub fn new(rules: Vec<FsRule>) -> RuleSet {
        RuleSet { rules }
    }

    /// Whether there are no rules (the fast path: no path bookkeeping needed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The verdict for `op` on the guest path `path` (raw bytes from the guest).
    pub fn check(&self, op: Op, path: &[u8]) -> Verdict {
        use std::os::unix::ffi::OsStrExt;
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
        let mut v = Verdict::Allow;
        for r in &self.rules {
            if r.covers(op, p) {
                match r.action {
                    Action::Deny => return Verdict::Deny,
                    Action::Audit => v = Verdict::Audit,
                }
            }
        }
        v
    }

    /// The verdict for `op` moving or removing the directory `dir` as a whole: what the rules
    /// say about anything that could be below it (see the module docs).
    pub fn check_below(&self, op: Op, dir: &[u8]) -> Verdict {
        let mut v = Verdict::Allow;
        for r in &self.rules {
            if r.names(op) && r.could_match_below(dir) {
                match r.action {
                    Action::Deny => return Verdict::Deny,
                    Action::Audit => v = Verdict::Audit,
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        let r: FsRule = "deny write,create,remove /workspace/.git/hooks/**"
            .parse()
            .unwrap();
        let set = RuleSet::new(vec![r, "audit read /workspace/*.env".parse().unwrap()]);
        assert_eq!(
            set.check(Op::Write, b"/workspace/.git/hooks/pre-commit"),
            Verdict::Deny
        );
        assert_eq!(
            set.check(Op::Create, b"/workspace/.git/hooks/a/b"),
            Verdict::Deny
        );
        assert_eq!(
            set.check(Op::Read, b"/workspace/.git/hooks/pre-commit"),
            Verdict::Allow
        );
        assert_eq!(
            set.check(Op::Write, b"/workspace/.git/config"),
            Verdict::Allow
        );
        assert_eq!(set.check(Op::Read, b"/workspace/x.env"), Verdict::Audit);
        assert_eq!(set.check(Op::Read, b"/workspace/d/x.env"), Verdict::Allow);
        assert_eq!(set.check(Op::Read, b"/workspace/\xff.env"), Verdict::Audit);
    }

    #[test]
    fn write_covers_every_change() {
        let set = RuleSet::new(vec!["deny write /w/.git/**".parse().unwrap()]);
        for op in Op::ALL {
            let want = if op.modifies() {
                Verdict::Deny
            } else {
                Verdict::Allow
            };
            assert_eq!(set.check(op, b"/w/.git/hooks/x"), want, "{op}");
        }
        // The narrow names stay narrow.
        let set = RuleSet::new(vec!["deny create /w/.git/**".parse().unwrap()]);
        assert_eq!(set.check(Op::Rename, b"/w/.git/x"), Verdict::Allow);
    }

    #[test]
    fn directories_above_protected_paths_cannot_move() {
        let set = RuleSet::new(vec![
            "deny write,create,remove /w/.git/**".parse().unwrap(),
            "deny write /w/*.env".parse().unwrap(),
            "audit rename /w/**/logs/*".parse().unwrap(),
        ]);
        for dir in [&b"/w/.git"[..], b"/w/.git/hooks", b"/w", b"/"] {
            assert_eq!(set.check_below(Op::Rename, dir), Verdict::Deny, "{dir:?}");
            assert_eq!(set.check_below(Op::Remove, dir), Verdict::Deny, "{dir:?}");
        }
        // `*.env` cannot reach below a subdirectory; `**/logs/*` can, but only audits.
        assert_eq!(set.check_below(Op::Rename, b"/w/src"), Verdict::Audit);
        assert_eq!(set.check_below(Op::Rename, b"/elsewhere"), Verdict::Allow);
        assert_eq!(set.check_below(Op::Read, b"/w/.git"), Verdict::Allow);
        let set = RuleSet::new(vec!["deny write /w/*/secret".parse().unwrap()]);
        assert_eq!(set.check_below(Op::Rename, b"/w/a"), Verdict::Deny);
        assert_eq!(set.check_below(Op::Rename, b"/w/a/b"), Verdict::Allow);
        assert_eq!(set.check_below(Op::Rename, b"/v"), Verdict::Allow);
    }

    #[test]
    fn bad_rules_say_why() {
        for (s, want) in [
            ("deny", "expected"),
            ("allow read /x", "unknown action"),
            ("deny frob /x", "unknown operation"),
            ("deny read x/**", "absolute"),
            ("deny read /x/[", "bad glob"),
        ] {
            let e = s.parse::<FsRule>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        let all: FsRule = "deny all /x".parse().unwrap();
        assert_eq!(all.ops.len(), Op::ALL.len());
    }
}
