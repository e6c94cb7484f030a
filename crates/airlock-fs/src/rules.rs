//! File rules: which guest operations on which paths are denied or audited.
//!
//! A rule is `ACTION OPS GLOB`, e.g. `deny write,create,remove /workspace/.git/hooks/**`:
//! ACTION is `deny` (the guest gets EACCES and an event is logged) or `audit` (allowed, but
//! logged); OPS is a comma list of [`Op`] names; GLOB matches guest paths (`*` stays within one
//! component, `**` crosses them). The first matching `deny` wins over any `audit`.

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
    bits: u16,
}

impl FsRule {
    fn covers(&self, op: Op, path: &std::path::Path) -> bool {
        self.bits & op.bit() != 0 && self.matcher.is_match(path)
    }
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
        let matcher = GlobBuilder::new(glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("file rule {s:?}: bad glob: {e}"))?
            .compile_matcher();
        let bits = list.iter().fold(0, |b, o| b | o.bit());
        Ok(FsRule {
            action,
            ops: list,
            glob: glob.to_string(),
            matcher,
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
