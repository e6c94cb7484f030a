//! A hostile FUSE client: requests a guest kernel would never send, straight at the server's
//! filesystem, against a real directory with secrets next to it. None may reach outside.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use airlock_fs::guard::GuardFs;
use airlock_fs::{guard_for, Access, FsEvent, FsRule, IdMap, Op, ShareConfig};
use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn, SetattrValid};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

const ROOT: u64 = 1;
const SECRET: &str = "TOP-SECRET-OUTSIDE";

struct Fixture {
    _tmp: tempfile::TempDir,
    share: std::path::PathBuf,
    outside: std::path::PathBuf,
    fs: GuardFs,
    events: Arc<Mutex<Vec<FsEvent>>>,
}

fn fixture(access: Access, rules: &[&str]) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), SECRET).unwrap();
    std::fs::write(share.join("file"), "inside").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), share.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside", share.join("rel-dir-link")).unwrap();
    std::os::unix::fs::symlink("rel-dir-link", share.join("chain")).unwrap();
    nix_mkfifo(&share.join("fifo"));
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let cfg = ShareConfig {
        quota: None,
        host_dir: share.clone(),
        guest_path: "/w".into(),
        tag: "t".into(),
        access,
        ids: IdMap {
            host: current_ids(),
            guest: (1000, 1000),
        },
        rules: rules.iter().map(|r| r.parse::<FsRule>().unwrap()).collect(),
    };
    let fs = guard_for(&cfg, Some(Arc::new(move |e| ev.lock().unwrap().push(e)))).unwrap();
    Fixture {
        _tmp: tmp,
        share,
        outside,
        fs,
        events,
    }
}

fn current_ids() -> (u32, u32) {
    // SAFETY: cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

fn nix_mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn ctx() -> Context {
    Context {
        uid: 1000,
        gid: 1000,
        pid: 1,
    }
}

fn errno<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn lookup(f: &Fixture, parent: u64, name: &str) -> io::Result<u64> {
    f.fs.lookup(&ctx(), parent, &c(name)).map(|e| e.inode)
}

fn create_args(flags: i32, mode: u32) -> CreateIn {
    CreateIn {
        flags: flags as u32,
        mode,
        umask: 0,
        fuse_flags: 0,
    }
}

fn outside_untouched(f: &Fixture) {
    let names: Vec<_> = std::fs::read_dir(&f.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    assert_eq!(
        std::fs::read_to_string(f.outside.join("secret")).unwrap(),
        SECRET
    );
}

#[test]
fn dotdot_at_root_is_the_root() {
    let f = fixture(Access::ReadWrite, &[]);
    let dot = lookup(&f, ROOT, ".").unwrap();
    let up = lookup(&f, ROOT, "..").unwrap();
    assert_eq!(up, dot);
    let sub = lookup(&f, ROOT, "sub").unwrap();
    assert!(lookup(&f, lookup(&f, sub, "..").unwrap(), "file").is_ok());
}

#[test]
fn names_with_slashes_or_dots_are_refused() {
    let f = fixture(Access::ReadWrite, &[]);
    for n in ["../outside", "/etc/passwd", "sub/../../outside", "", "a/b"] {
        assert_eq!(errno(lookup(&f, ROOT, n)), libc::EINVAL, "lookup {n:?}");
    }
    for n in ["..", ".", "../x", "a/b"] {
        assert_eq!(
            errno(f.fs.create(&ctx(), ROOT, &c(n), create_args(libc::O_WRONLY, 0o644))),
            libc::EINVAL,
            "create {n:?}"
        );
        assert_eq!(
            errno(f.fs.mkdir(&ctx(), ROOT, &c(n), 0o755, 0)),
            libc::EINVAL
        );
        assert_eq!(errno(f.fs.unlink(&ctx(), ROOT, &c(n))), libc::EINVAL);
        assert_eq!(
            errno(f.fs.rename(&ctx(), ROOT, &c("file"), ROOT, &c(n), 0)),
            libc::EINVAL
        );
        assert_eq!(
            errno(f.fs.symlink(&ctx(), &c("/x"), ROOT, &c(n))),
            libc::EINVAL
        );
    }
    let long = "a".repeat(256);
    assert_ne!(errno(lookup(&f, ROOT, &long)), 0);
    assert!(f.share.join("file").exists());
    outside_untouched(&f);
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let f = fixture(Access::ReadWrite, &[]);
    for link in ["abs-link", "rel-dir-link", "chain"] {
        let ino = lookup(&f, ROOT, link).unwrap();
        // Opening the link itself: refused, never the target.
        assert_eq!(
            errno(f.fs.open(&ctx(), ino, libc::O_RDONLY as u32, 0)),
            libc::EACCES
        );
        // Walking through it as a directory: not a directory on the host.
        assert_ne!(errno(lookup(&f, ino, "secret")), 0, "{link}");
        // Creating through it.
        assert_ne!(
            errno(f.fs.create(
                &ctx(),
                ino,
                &c("planted"),
                create_args(libc::O_WRONLY, 0o644)
            )),
            0
        );
        assert_ne!(errno(f.fs.opendir(&ctx(), ino, 0)), 0, "opendir {link}");
        // readlink only returns text.
        assert!(f.fs.readlink(&ctx(), ino).is_ok());
    }
    outside_untouched(&f);
}

#[test]
fn symlink_swap_race_stays_inside() {
    // A directory the guest holds is replaced by a symlink to the outside behind its back:
    // later requests on the held inode still name the original directory, never the link.
    let f = fixture(Access::ReadWrite, &[]);
    std::fs::create_dir(f.share.join("race")).unwrap();
    let held = lookup(&f, ROOT, "race").unwrap();
    std::fs::rename(f.share.join("race"), f.share.join("race-old")).unwrap();
    std::os::unix::fs::symlink(&f.outside, f.share.join("race")).unwrap();
    assert_ne!(errno(lookup(&f, held, "secret")), 0);
    f.fs.create(&ctx(), held, &c("made"), create_args(libc::O_WRONLY, 0o644))
        .unwrap();
    assert!(f.share.join("race-old/made").exists());
    // A fresh lookup of the name finds the symlink, and walking it is refused.
    let swapped = lookup(&f, ROOT, "race").unwrap();
    assert_ne!(errno(lookup(&f, swapped, "secret")), 0);
    outside_untouched(&f);
}

#[test]
fn no_device_nodes_fifos_or_special_files() {
    let f = fixture(Access::ReadWrite, &[]);
    for (mode, name) in [
        (libc::S_IFBLK | 0o666, "sda"),
        (libc::S_IFCHR | 0o666, "mem"),
    ] {
        assert_eq!(
            errno(f.fs.mknod(&ctx(), ROOT, &c(name), mode, (1 << 8) | 1, 0)),
            libc::EPERM
        );
        assert!(!f.share.join(name).exists());
    }
    // A FIFO (the host's own) is never opened: that would block the server.
    let fifo = lookup(&f, ROOT, "fifo").unwrap();
    assert_eq!(
        errno(f.fs.open(&ctx(), fifo, libc::O_RDONLY as u32, 0)),
        libc::EACCES
    );
    // Nor a directory through open().
    let sub = lookup(&f, ROOT, "sub").unwrap();
    assert_eq!(
        errno(f.fs.open(&ctx(), sub, libc::O_RDONLY as u32, 0)),
        libc::EACCES
    );
}

#[test]
fn hardlinks_cannot_name_outside_files() {
    let f = fixture(Access::ReadWrite, &[]);
    // The only inodes a client can name are ones it looked up inside; an unknown number fails.
    assert_ne!(errno(f.fs.link(&ctx(), 999_999, ROOT, &c("stolen"))), 0);
    assert_ne!(errno(f.fs.getattr(&ctx(), 999_999, None)), 0);
    assert!(!f.share.join("stolen").exists());
    let file = lookup(&f, ROOT, "file").unwrap();
    f.fs.link(&ctx(), file, ROOT, &c("file2")).unwrap();
    assert_eq!(
        std::fs::read_to_string(f.share.join("file2")).unwrap(),
        "inside"
    );
    outside_untouched(&f);
}

#[test]
fn ownership_maps_to_the_sandbox_user_and_no_setuid() {
    let f = fixture(Access::ReadWrite, &[]);
    let (e, _, _, _) =
        f.fs.create(
            &ctx(),
            ROOT,
            &c("made"),
            create_args(libc::O_WRONLY, 0o4755 | libc::S_IFREG),
        )
        .unwrap();
    // Inside: the sandbox user. Outside: the host user, no setuid bit.
    assert_eq!((e.attr.st_uid, e.attr.st_gid), (1000, 1000));
    let m = std::fs::metadata(f.share.join("made")).unwrap();
    assert_eq!((m.uid(), m.gid()), current_ids());
    assert_eq!(m.permissions().mode() & 0o6000, 0);
    // chmod u+s is stripped; chown to the sandbox user maps back; to anyone else is refused.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_mode = 0o4755;
    f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(
        std::fs::metadata(f.share.join("made"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    attr.st_uid = 1000;
    attr.st_gid = 1000;
    f.fs.setattr(
        &ctx(),
        e.inode,
        attr,
        None,
        SetattrValid::UID | SetattrValid::GID,
    )
    .unwrap();
    assert_eq!(
        std::fs::metadata(f.share.join("made")).unwrap().uid(),
        current_ids().0
    );
    attr.st_uid = 4242;
    assert_eq!(
        errno(f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::UID)),
        libc::EPERM
    );
}

#[test]
fn read_only_share_refuses_every_change() {
    let f = fixture(Access::ReadOnly, &[]);
    let file = lookup(&f, ROOT, "file").unwrap();
    let sub = lookup(&f, ROOT, "sub").unwrap();
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_size = 0;
    let results = [
        errno(f.fs.open(&ctx(), file, libc::O_RDWR as u32, 0)),
        errno(f.fs.open(&ctx(), file, (libc::O_RDONLY | libc::O_TRUNC) as u32, 0)),
        errno(f.fs.create(&ctx(), ROOT, &c("n"), create_args(libc::O_WRONLY, 0o644))),
        errno(f.fs.mkdir(&ctx(), ROOT, &c("d"), 0o755, 0)),
        errno(f.fs.unlink(&ctx(), ROOT, &c("file"))),
        errno(f.fs.rmdir(&ctx(), ROOT, &c("sub"))),
        errno(f.fs.rename(&ctx(), ROOT, &c("file"), sub, &c("file"), 0)),
        errno(f.fs.symlink(&ctx(), &c("x"), ROOT, &c("l"))),
        errno(f.fs.link(&ctx(), file, ROOT, &c("l2"))),
        errno(f.fs.setattr(&ctx(), file, attr, None, SetattrValid::SIZE)),
        errno(f.fs.mknod(&ctx(), ROOT, &c("p"), libc::S_IFIFO | 0o644, 0, 0)),
    ];
    assert!(results.iter().all(|&e| e == libc::EROFS), "{results:?}");
    assert!(f.fs.open(&ctx(), file, libc::O_RDONLY as u32, 0).is_ok());
    assert_eq!(
        std::fs::read_to_string(f.share.join("file")).unwrap(),
        "inside"
    );
}

#[test]
fn rules_deny_with_eacces_and_log() {
    let f = fixture(
        Access::ReadWrite,
        &["deny write,create,remove /w/sub/**", "audit read /w/file"],
    );
    let sub = lookup(&f, ROOT, "sub").unwrap();
    assert_eq!(
        errno(f.fs.create(&ctx(), sub, &c("hook"), create_args(libc::O_WRONLY, 0o755))),
        libc::EACCES
    );
    std::fs::write(f.share.join("sub/existing"), "orig").unwrap();
    let ex = lookup(&f, sub, "existing").unwrap();
    assert_eq!(
        errno(f.fs.open(&ctx(), ex, libc::O_WRONLY as u32, 0)),
        libc::EACCES
    );
    assert_eq!(
        errno(f.fs.unlink(&ctx(), sub, &c("existing"))),
        libc::EACCES
    );
    // A second name for a protected file would dodge the rule.
    assert_eq!(
        errno(f.fs.link(&ctx(), ex, ROOT, &c("alias"))),
        libc::EACCES
    );
    assert!(f.fs.open(&ctx(), ex, libc::O_RDONLY as u32, 0).is_ok());
    let file = lookup(&f, ROOT, "file").unwrap();
    assert!(f.fs.open(&ctx(), file, libc::O_RDONLY as u32, 0).is_ok());
    let ev = f.events.lock().unwrap().clone();
    let want = [
        (Op::Create, "/w/sub/hook", true),
        (Op::Write, "/w/sub/existing", true),
        (Op::Remove, "/w/sub/existing", true),
        (Op::Write, "/w/sub/existing", true),
        (Op::Read, "/w/file", false),
    ];
    let got: Vec<_> = ev
        .iter()
        .map(|e| (e.op, e.path.as_str(), e.denied))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        std::fs::read_to_string(f.share.join("sub/existing")).unwrap(),
        "orig"
    );
    assert!(!f.share.join("sub/hook").exists());
}

/// Issue 18.1: a rule holds by what a path is, whatever the guest renames around it. Every
/// attack here once got through (`mv /w/sub /w/g2`, write, `mv /w/g2 /w/sub`; rename in and
/// out; mkdir, chmod and utimes under a `write,create,remove` rule).
#[test]
fn renames_around_a_rule_cannot_dodge_it() {
    for rule in ["deny all /w/sub/**", "deny write,create,remove /w/sub/**"] {
        let f = fixture(Access::ReadWrite, &[rule]);
        std::fs::create_dir(f.share.join("sub/hooks")).unwrap();
        std::fs::write(f.share.join("sub/hooks/pre"), "orig").unwrap();
        std::fs::create_dir(f.share.join("other")).unwrap();
        let sub = lookup(&f, ROOT, "sub").unwrap();
        let other = lookup(&f, ROOT, "other").unwrap();
        let file = lookup(&f, ROOT, "file").unwrap();
        // Moving the protected directory (or one above it) away, or another over it.
        for (od, on, nd, nn, flags) in [
            (ROOT, "sub", ROOT, "g2", 0),
            (ROOT, "sub", other, "sub", 0),
            (ROOT, "other", ROOT, "sub", libc::RENAME_EXCHANGE),
            (ROOT, "other", ROOT, "sub", 0),
        ] {
            assert_eq!(
                errno(f.fs.rename(&ctx(), od, &c(on), nd, &c(nn), flags)),
                libc::EACCES,
                "{rule}: rename {on} -> {nn} (flags {flags})"
            );
        }
        // Rename into and out of it.
        assert_eq!(
            errno(f.fs.rename(&ctx(), ROOT, &c("file"), sub, &c("file"), 0)),
            libc::EACCES,
            "{rule}: rename in"
        );
        if let Ok(hooks) = lookup(&f, sub, "hooks") {
            assert_eq!(
                errno(f.fs.rename(&ctx(), hooks, &c("pre"), ROOT, &c("pre"), 0)),
                libc::EACCES,
                "{rule}: rename out"
            );
            assert_eq!(
                errno(f.fs.rename(&ctx(), sub, &c("hooks"), sub, &c("h2"), 0)),
                libc::EACCES,
                "{rule}: rename inside"
            );
            let pre = lookup(&f, hooks, "pre").unwrap();
            // chmod, utimes, truncate.
            for valid in [
                SetattrValid::MODE,
                SetattrValid::MTIME_NOW | SetattrValid::ATIME_NOW,
                SetattrValid::MTIME,
                SetattrValid::SIZE,
            ] {
                // SAFETY: stat64 is plain data.
                let mut attr: stat64 = unsafe { std::mem::zeroed() };
                attr.st_mode = 0o777;
                assert_eq!(
                    errno(f.fs.setattr(&ctx(), pre, attr, None, valid)),
                    libc::EACCES,
                    "{rule}: setattr {valid:?}"
                );
            }
        }
        assert_eq!(
            errno(f.fs.mkdir(&ctx(), sub, &c("d"), 0o755, 0)),
            libc::EACCES,
            "{rule}: mkdir"
        );
        assert_eq!(errno(f.fs.rmdir(&ctx(), ROOT, &c("sub"))), libc::EACCES);
        // Elsewhere everything still works, renames of unrelated directories included.
        f.fs.rename(&ctx(), ROOT, &c("other"), ROOT, &c("other2"), 0)
            .unwrap();
        f.fs.rename(&ctx(), ROOT, &c("file"), ROOT, &c("file2"), 0)
            .unwrap();
        let _ = file;
        assert_eq!(
            std::fs::read_to_string(f.share.join("sub/hooks/pre")).unwrap(),
            "orig"
        );
        let m = std::fs::metadata(f.share.join("sub/hooks/pre")).unwrap();
        assert_ne!(m.permissions().mode() & 0o777, 0o777);
        assert!(f.share.join("sub").is_dir() && !f.share.join("g2").exists());
        assert!(!f.share.join("sub/file").exists() && !f.share.join("sub/d").exists());
    }
}
