//! Arbitrary bytes as a sequence of hostile FUSE requests (names, inode numbers, modes, flags)
//! against Airlock's virtio-fs policy layer over a fresh shared directory, with file rules on.
//! Must never panic, and nothing outside the share may change (a sibling canary and an
//! outside directory reachable through a symlink in the share must survive as they were).
#![no_main]

use std::ffi::CString;

use airlock_fs::{guard_for, Access, FsRule, IdMap, ShareConfig};
use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn, SetattrValid};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use libfuzzer_sys::fuzz_target;

fn name(d: &mut &[u8]) -> CString {
    let n = (d.first().copied().unwrap_or(0) % 12) as usize;
    *d = d.get(1..).unwrap_or(&[]);
    let take = n.min(d.len());
    let mut v: Vec<u8> = d[..take].iter().map(|&b| if b == 0 { b'.' } else { b }).collect();
    *d = &d[take..];
    if v.is_empty() {
        v.push(b'a');
    }
    CString::new(v).unwrap()
}

fn byte(d: &mut &[u8]) -> u8 {
    let b = d.first().copied().unwrap_or(0);
    *d = d.get(1..).unwrap_or(&[]);
    b
}

fuzz_target!(|data: &[u8]| {
    let Ok(base) = tempfile::tempdir() else { return };
    let share = base.path().join("share");
    let outside = base.path().join("outside");
    let canary = base.path().join("canary");
    if std::fs::create_dir_all(share.join("sub")).is_err()
        || std::fs::create_dir(&outside).is_err()
        || std::fs::write(&canary, b"c").is_err()
        || std::os::unix::fs::symlink(&outside, share.join("out")).is_err()
        || std::os::unix::fs::symlink("../canary", share.join("can")).is_err()
    {
        return;
    }
    let cfg = ShareConfig {
        host_dir: share.clone(),
        guest_path: "/w".into(),
        tag: "f".into(),
        access: Access::ReadWrite,
        ids: IdMap { host: (0, 0), guest: (1000, 1000) },
        rules: vec!["deny write,remove /w/sub/**".parse::<FsRule>().unwrap()],
        // Small, so the fuzzer reaches the ENOSPC paths too.
        quota: Some(1 << 20),
    };
    let Ok(fs) = guard_for(&cfg, None) else { return };
    let ctx = Context { uid: 1000, gid: 1000, pid: 1 };
    let mut inodes: Vec<u64> = vec![1];
    let mut d = data;
    while !d.is_empty() {
        let op = byte(&mut d) % 12;
        let pick = |i: u8, v: &Vec<u64>| if i & 0x80 != 0 { i as u64 } else { v[i as usize % v.len()] };
        let a = pick(byte(&mut d), &inodes);
        let b = pick(byte(&mut d), &inodes);
        let n1 = name(&mut d);
        let n2 = name(&mut d);
        let mode = (byte(&mut d) as u32) << 8 | byte(&mut d) as u32;
        let flags = byte(&mut d) as u32 | ((byte(&mut d) as u32) << 8);
        let new = match op {
            0 => fs.lookup(&ctx, a, &n1).ok().map(|e| e.inode),
            1 => fs
                .create(&ctx, a, &n1, CreateIn { flags, mode: libc::S_IFREG | (mode & 0o7777), umask: 0, fuse_flags: 0 })
                .ok()
                .map(|r| r.0.inode),
            2 => fs.mkdir(&ctx, a, &n1, mode, 0).ok().map(|e| e.inode),
            3 => fs.mknod(&ctx, a, &n1, mode << 4, 0x0801, 0).ok().map(|e| e.inode),
            4 => fs.symlink(&ctx, &n2, a, &n1).ok().map(|e| e.inode),
            5 => fs.link(&ctx, a, b, &n1).ok().map(|e| e.inode),
            6 => fs.rename(&ctx, a, &n1, b, &n2, flags & 7).ok().map(|_| 0),
            7 => fs.unlink(&ctx, a, &n1).ok().map(|_| 0),
            8 => fs.rmdir(&ctx, a, &n1).ok().map(|_| 0),
            9 => {
                // Opened handles are released at once; their existence is what matters.
                if let Ok((Some(h), _, _)) = fs.open(&ctx, a, flags, 0) {
                    let _ = fs.release(&ctx, a, 0, h, false, false, None);
                }
                None
            }
            10 => {
                let mut st: stat64 = unsafe { std::mem::zeroed() };
                st.st_mode = mode;
                st.st_uid = 1000;
                st.st_size = 0;
                let valid = SetattrValid::from_bits_truncate(flags);
                fs.setattr(&ctx, a, st, None, valid).ok().map(|_| 0)
            }
            _ => {
                fs.forget(&ctx, a, (flags & 3) as u64);
                None
            }
        };
        if let Some(i) = new.filter(|i| *i > 1) {
            if inodes.len() < 64 {
                inodes.push(i);
            }
        }
    }
    assert_eq!(std::fs::read(&canary).ok().as_deref(), Some(&b"c"[..]), "canary changed");
    assert_eq!(std::fs::read_dir(&outside).map(|r| r.count()).ok(), Some(0), "wrote outside");
});
