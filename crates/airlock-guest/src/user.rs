//! Resolves `--user` the way Docker does, from the image's /etc/passwd and /etc/group.

use std::fs;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub name: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// (name, gid, members)
fn groups(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolves `spec` (`name`, `uid`, `name:group`, `uid:gid`; empty = root) against the files'
/// contents.
pub fn resolve_with(spec: &str, passwd_text: &str, group_text: &str) -> Result<Identity, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let users = passwd(passwd_text);
    let all_groups = groups(group_text);

    let entry = users.iter().find(|e| e.name == user_part).or_else(|| {
        user_part
            .parse::<u32>()
            .ok()
            .and_then(|uid| users.iter().find(|e| e.uid == uid))
    });
    let (uid, mut gid, home, name) = match entry {
        Some(e) => (e.uid, e.gid, e.home.clone(), Some(e.name.clone())),
        None => match user_part.parse::<u32>() {
            Ok(uid) => (uid, 0, "/".to_string(), None),
            Err(_) => {
                return Err(format!(
                    "unable to find user {user_part}: no matching entries in passwd file"
                ))
            }
        },
    };
    if let Some(g) = group_part {
        gid = match all_groups.iter().find(|(n, _, _)| n == g) {
            Some((_, id, _)) => *id,
            None => g.parse().map_err(|_| {
                format!("unable to find group {g}: no matching entries in group file")
            })?,
        };
    }
    let mut supplementary = vec![gid];
    if let Some(n) = &name {
        for (_, id, members) in &all_groups {
            if members.iter().any(|m| m == n) && !supplementary.contains(id) {
                supplementary.push(*id);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: if home.is_empty() { "/".into() } else { home },
        name,
    })
}

/// Resolves `spec` against `root`'s /etc/passwd and /etc/group (an exec root; `""` is the
/// VM's own root). Both files are read with a size bound: a root may hold anything.
pub fn resolve_in(root: &str, spec: &str) -> Result<Identity, String> {
    use std::io::Read;
    let read = |name: &str| {
        let mut s = String::new();
        if let Ok(f) = fs::File::open(format!("{root}{name}")) {
            let _ = f.take(16 << 20).read_to_string(&mut s);
        }
        s
    };
    if !root.is_empty() || !spec.is_empty() {
        return resolve_with(spec, &read("/etc/passwd"), &read("/etc/group"));
    }
    // The common case, the VM's root user: remembered while both files stay as they were
    // (same inode, size, modification and change times), so most execs stat them instead of
    // reading and parsing them.
    let key = || {
        use std::os::unix::fs::MetadataExt;
        let stamp = |p: &str| {
            fs::metadata(p).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            })
        };
        (stamp("/etc/passwd"), stamp("/etc/group"))
    };
    type Key = (Option<Stamp>, Option<Stamp>);
    type Stamp = (u64, u64, u64, i64, i64, i64, i64);
    static ROOT: std::sync::Mutex<Option<(Key, Identity)>> = std::sync::Mutex::new(None);
    let before = key();
    if let Some((k, id)) = ROOT.lock().unwrap().as_ref() {
        if *k == before {
            return Ok(id.clone());
        }
    }
    let id = resolve_with(spec, &read("/etc/passwd"), &read("/etc/group"))?;
    // Cached only if neither file changed while it was read.
    if key() == before {
        *ROOT.lock().unwrap() = Some((before, id.clone()));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken line\n";
    const G: &str = "root:x:0:\nusers:x:100:alice,bob\nalice:x:1000:\nnogroup:x:65534:\n";

    #[test]
    fn docker_forms() {
        let r = resolve_with("", P, G).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
        let a = resolve_with("alice", P, G).unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.groups, vec![1000, 100]);
        assert_eq!(a.home, "/home/alice");
        assert_eq!(
            resolve_with("1000", P, G).unwrap().name.as_deref(),
            Some("alice")
        );
        let n = resolve_with("4242", P, G).unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 0, "/"));
        let ag = resolve_with("alice:users", P, G).unwrap();
        assert_eq!(ag.gid, 100);
        assert_eq!(resolve_with("5:7", P, G).unwrap().gid, 7);
        assert!(resolve_with("mallory", P, G)
            .unwrap_err()
            .contains("unable to find user mallory"));
        assert!(resolve_with("alice:nope", P, G).is_err());
    }

    #[test]
    fn malformed_lines_are_skipped_not_trusted() {
        // Short lines, non-numeric ids and empty files never resolve to anyone.
        let p = "short:x:1\nbad:x:abc:0::/:/bin/sh\nok:x:7:8::/home/ok:/bin/sh\n";
        assert_eq!(passwd(p).len(), 1);
        assert!(resolve_with("bad", p, "").is_err());
        let ok = resolve_with("ok", p, "").unwrap();
        assert_eq!((ok.uid, ok.gid, ok.groups.clone()), (7, 8, vec![8]));
        assert_eq!(groups("g:x:notanumber:a\nh:x:5:\n").len(), 1);
        // An empty home becomes "/".
        let r = resolve_with("n", "n:x:9:9:::/bin/sh\n", "").unwrap();
        assert_eq!(r.home, "/");
        // No passwd at all: numeric users still work, names do not.
        assert_eq!(resolve_with("0", "", "").unwrap().uid, 0);
        assert!(resolve_with("root", "", "").is_err());
    }
}
