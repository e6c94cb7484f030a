//! The policy layer between the guest's FUSE requests and fuse-backend-rs's passthrough:
//! read-only shares, file rules with audit events, device-node and special-file refusal, and
//! the owner mapping (host user ↔ sandbox user).
//!
//! Confinement itself comes from the passthrough: every name is resolved one component at a
//! time with `openat(parent_fd, name, O_PATH|O_NOFOLLOW)` from an inode the guest already
//! holds, `..` at the share root resolves to the root, and names with `/` are refused. This
//! layer adds its own name check (so it never relies on a configuration flag) and refuses
//! opening anything but regular files, so a FIFO or a device node in the share can neither block
//! the server nor reach a host device.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use crate::rules::{Op, RuleSet, Verdict};
use crate::{FsEvent, FsEventSink};

const ROOT: u64 = 1;
/// Never set on the host: a guest-made setuid file would run as the host user outside.
const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
/// Deepest path the bookkeeping follows (a loop or a hostile chain ends here).
const MAX_DEPTH: usize = 4096;

/// Why a guest-supplied name is refused (`EINVAL`), or `None` if it is a plain component.
/// `lookup` additionally accepts `.` and `..` (the kernel's NFS-export path sends them).
pub fn bad_name(name: &[u8], lookup: bool) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty name");
    }
    if name.len() > 255 {
        return Some("name longer than 255 bytes");
    }
    if name.contains(&b'/') {
        return Some("name contains '/'");
    }
    if !lookup && (name == b"." || name == b"..") {
        return Some("dot name");
    }
    None
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}
fn eacces() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}
fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}
fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

struct Node {
    parent: u64,
    name: Vec<u8>,
    nlookup: u64,
}

/// Inode → (parent, name), maintained from the replies the guest sees, so rules can match
/// paths. Only kept when there are rules.
#[derive(Default)]
pub struct PathTable {
    nodes: HashMap<u64, Node>,
}

impl PathTable {
    /// Records that `inode` was returned to the guest as `parent/name`.
    pub fn remember(&mut self, inode: u64, parent: u64, name: &[u8]) {
        if inode == ROOT || inode == 0 {
            return;
        }
        if name == b"." || name == b".." {
            // Another reference to a directory we already know by its real name.
            if let Some(n) = self.nodes.get_mut(&inode) {
                n.nlookup = n.nlookup.saturating_add(1);
            }
            return;
        }
        let n = self.nodes.entry(inode).or_insert(Node {
            parent,
            name: Vec::new(),
            nlookup: 0,
        });
        n.parent = parent;
        n.name = name.to_vec();
        n.nlookup = n.nlookup.saturating_add(1);
    }

    /// The guest dropped `count` references to `inode`.
    pub fn forget(&mut self, inode: u64, count: u64) {
        if let Some(n) = self.nodes.get_mut(&inode) {
            n.nlookup = n.nlookup.saturating_sub(count);
            if n.nlookup == 0 {
                self.nodes.remove(&inode);
            }
        }
    }

    /// A successful rename: whatever was `olddir/oldname` is now `newdir/newname`.
    pub fn renamed(&mut self, olddir: u64, oldname: &[u8], newdir: u64, newname: &[u8]) {
        for n in self.nodes.values_mut() {
            if n.parent == olddir && n.name == oldname {
                n.parent = newdir;
                n.name = newname.to_vec();
                break;
            }
        }
    }

    /// A successful `RENAME_EXCHANGE`: the two names swapped their inodes.
    pub fn exchanged(&mut self, adir: u64, aname: &[u8], bdir: u64, bname: &[u8]) {
        let find = |nodes: &HashMap<u64, Node>, dir: u64, name: &[u8]| {
            nodes
                .iter()
                .find(|(_, n)| n.parent == dir && n.name == name)
                .map(|(i, _)| *i)
        };
        let (a, b) = (
            find(&self.nodes, adir, aname),
            find(&self.nodes, bdir, bname),
        );
        for (inode, dir, name) in [(a, bdir, bname), (b, adir, aname)] {
            if let Some(n) = inode.and_then(|i| self.nodes.get_mut(&i)) {
                n.parent = dir;
                n.name = name.to_vec();
            }
        }
    }

    /// Path of `inode` relative to the share root (`""` for the root), if known.
    pub fn path(&self, mut inode: u64) -> Option<Vec<u8>> {
        let mut parts: Vec<&[u8]> = Vec::new();
        for _ in 0..MAX_DEPTH {
            if inode == ROOT {
                let mut out = Vec::new();
                for p in parts.iter().rev() {
                    out.push(b'/');
                    out.extend_from_slice(p);
                }
                return Some(out);
            }
            let n = self.nodes.get(&inode)?;
            parts.push(&n.name);
            inode = n.parent;
        }
        None
    }
}

/// Access mode of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Guest writes reach the host.
    ReadWrite,
    /// Every change is refused with EROFS.
    ReadOnly,
}

/// Owner mapping: files of `host` appear as `guest` inside, and the guest's `guest` maps back.
#[derive(Debug, Clone, Copy)]
pub struct IdMap {
    /// Host uid/gid Airlock runs as.
    pub host: (u32, u32),
    /// The sandbox user's uid/gid.
    pub guest: (u32, u32),
}

/// The policy-enforcing filesystem served to one share.
pub struct GuardFs {
    inner: PassthroughFs<()>,
    access: Access,
    ids: IdMap,
    rules: RuleSet,
    /// Guest mount point, prefixed to share-relative paths for rule matching and events.
    guest_root: Vec<u8>,
    tag: String,
    sink: Option<FsEventSink>,
    paths: Mutex<PathTable>,
    /// Serialises renames (see [`GuardFs::rename`]).
    renames: Mutex<()>,
    /// How much the guest may grow the share, if bounded.
    quota: Option<Quota>,
}

/// A bound on how many bytes of host disk the guest may add to a share.
///
/// Counted in allocated blocks (`st_blocks`) before and after each write, fallocate and
/// truncate, credited when a file's last name goes (unlink, rename over it). Files the share
/// held at the start count as they are freed, so the share never grows past its starting size
/// plus the limit. Inodes are not counted. Concurrent writes may overshoot by at most one
/// request each (a FUSE write is at most 1 MiB).
#[derive(Debug)]
struct Quota {
    limit: u64,
    /// Bytes added since the start; negative when the guest freed more than it added.
    added: std::sync::atomic::AtomicI64,
}

impl Quota {
    fn used(&self) -> u64 {
        self.added.load(std::sync::atomic::Ordering::Relaxed).max(0) as u64
    }

    fn would_exceed(&self, more: u64) -> bool {
        self.added
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_add(more.min(i64::MAX as u64) as i64)
            > self.limit.min(i64::MAX as u64) as i64
    }

    fn add(&self, before: &stat64, after: &stat64) {
        let delta = (after.st_blocks - before.st_blocks).saturating_mul(512);
        self.added
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    fn free(&self, st: &stat64) {
        self.added.fetch_sub(
            st.st_blocks.saturating_mul(512),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl GuardFs {
    /// Wraps `inner` (already imported).
    pub fn new(
        inner: PassthroughFs<()>,
        access: Access,
        ids: IdMap,
        rules: RuleSet,
        guest_root: &str,
        tag: &str,
        sink: Option<FsEventSink>,
    ) -> GuardFs {
        GuardFs {
            inner,
            access,
            ids,
            rules,
            guest_root: guest_root.trim_end_matches('/').as_bytes().to_vec(),
            tag: tag.to_string(),
            sink,
            paths: Mutex::new(PathTable::default()),
            renames: Mutex::new(()),
            quota: None,
        }
    }

    /// Lets the guest add at most `bytes` to the share (ENOSPC beyond); `statfs` then reports
    /// the share's own room, not the host disk's.
    pub fn with_quota(mut self, bytes: u64) -> GuardFs {
        self.quota = Some(Quota {
            limit: bytes,
            added: std::sync::atomic::AtomicI64::new(0),
        });
        self
    }

    /// Host attributes of `inode` while a quota is kept (for before/after accounting).
    fn quota_stat(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> Option<stat64> {
        self.quota.as_ref()?;
        self.inner
            .getattr(&host_ctx(ctx), inode, handle)
            .ok()
            .map(|(st, _)| st)
    }

    /// The host attributes of `parent`/`name` when it is a non-directory whose last name this
    /// is (so removing or replacing that name frees its blocks).
    fn last_name_stat(&self, ctx: &Context, parent: u64, name: &CStr) -> Option<stat64> {
        self.quota.as_ref()?;
        let e = self.inner.lookup(&host_ctx(ctx), parent, name).ok()?;
        self.inner.forget(&host_ctx(ctx), e.inode, 1);
        let st = e.attr;
        (st.st_mode & libc::S_IFMT != libc::S_IFDIR && st.st_nlink <= 1).then_some(st)
    }

    fn credit(&self, st: Option<stat64>) {
        if let (Some(q), Some(st)) = (&self.quota, st) {
            q.free(&st);
        }
    }

    fn tracking(&self) -> bool {
        !self.rules.is_empty()
    }

    fn remember(&self, e: &Entry, parent: u64, name: &CStr) {
        if self.tracking() {
            self.paths
                .lock()
                .unwrap()
                .remember(e.inode, parent, name.to_bytes());
        }
    }

    fn guest_path(&self, inode: u64, child: Option<&CStr>) -> Option<Vec<u8>> {
        let rel = self.paths.lock().unwrap().path(inode)?;
        let mut p = self.guest_root.clone();
        p.extend_from_slice(&rel);
        if let Some(c) = child {
            p.push(b'/');
            p.extend_from_slice(c.to_bytes());
        }
        if p.is_empty() {
            p.push(b'/');
        }
        Some(p)
    }

    fn emit(&self, op: Op, path: &[u8], denied: bool) {
        if denied {
            tracing::info!(share = %self.tag, %op, path = %String::from_utf8_lossy(path), "file rule denied");
        }
        if let Some(s) = &self.sink {
            s(FsEvent {
                share: self.tag.clone(),
                op,
                path: String::from_utf8_lossy(path).into_owned(),
                denied,
            });
        }
    }

    /// Applies the rules to `op` on `inode[/child]`; unknown paths fail closed.
    fn check(&self, op: Op, inode: u64, child: Option<&CStr>) -> io::Result<()> {
        if !self.tracking() {
            return Ok(());
        }
        let Some(path) = self.guest_path(inode, child) else {
            self.emit(op, b"?", true);
            return Err(eacces());
        };
        match self.rules.check(op, &path) {
            Verdict::Allow => Ok(()),
            Verdict::Audit => {
                self.emit(op, &path, false);
                Ok(())
            }
            Verdict::Deny => {
                self.emit(op, &path, true);
                Err(eacces())
            }
        }
    }

    /// Applies the rules to `op` moving or removing `parent/child` with everything below it
    /// ([`RuleSet::check_below`]); unknown paths fail closed.
    fn check_below(&self, op: Op, parent: u64, child: &CStr) -> io::Result<()> {
        if !self.tracking() {
            return Ok(());
        }
        let Some(path) = self.guest_path(parent, Some(child)) else {
            self.emit(op, b"?", true);
            return Err(eacces());
        };
        match self.rules.check_below(op, &path) {
            Verdict::Allow => Ok(()),
            Verdict::Audit => {
                self.emit(op, &path, false);
                Ok(())
            }
            Verdict::Deny => {
                self.emit(op, &path, true);
                Err(eacces())
            }
        }
    }

    fn would_deny(&self, op: Op, inode: u64, child: &CStr) -> bool {
        self.tracking()
            && self
                .guest_path(inode, Some(child))
                .is_none_or(|p| self.rules.check(op, &p) == Verdict::Deny)
    }

    fn writable(&self) -> io::Result<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(erofs()),
        }
    }

    fn map_out(&self, st: &mut stat64) {
        if st.st_uid == self.ids.host.0 {
            st.st_uid = self.ids.guest.0;
        }
        if st.st_gid == self.ids.host.1 {
            st.st_gid = self.ids.guest.1;
        }
    }

    fn entry_out(&self, mut e: Entry, parent: u64, name: &CStr) -> Entry {
        self.map_out(&mut e.attr);
        self.remember(&e, parent, name);
        e
    }
}

fn name_ok(name: &CStr, lookup: bool) -> io::Result<()> {
    match bad_name(name.to_bytes(), lookup) {
        None => Ok(()),
        Some(_) => Err(einval()),
    }
}

/// Host identity for every request: the passthrough switches credentials only for a non-zero
/// uid/gid, so zero means "as Airlock's own user" whether or not that is root.
fn host_ctx(ctx: &Context) -> Context {
    Context {
        uid: 0,
        gid: 0,
        pid: ctx.pid,
    }
}

impl FileSystem for GuardFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        name_ok(name, true)?;
        let e = self.inner.lookup(&host_ctx(ctx), parent, name)?;
        Ok(self.entry_out(e, parent, name))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        if self.tracking() {
            self.paths.lock().unwrap().forget(inode, count);
        }
        self.inner.forget(&host_ctx(ctx), inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        if self.tracking() {
            let mut p = self.paths.lock().unwrap();
            for (i, c) in &requests {
                p.forget(*i, *c);
            }
        }
        self.inner.batch_forget(&host_ctx(ctx), requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let (mut st, d) = self.inner.getattr(&host_ctx(ctx), inode, handle)?;
        self.map_out(&mut st);
        Ok((st, d))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        // Size and timestamps are content and metadata: `write` (a rule naming it) covers them.
        let times = SetattrValid::ATIME
            | SetattrValid::MTIME
            | SetattrValid::ATIME_NOW
            | SetattrValid::MTIME_NOW
            | SetattrValid::CTIME;
        if valid.contains(SetattrValid::SIZE) || valid.intersects(times) {
            self.check(Op::Write, inode, None)?;
        }
        if valid.contains(SetattrValid::MODE) {
            self.check(Op::Chmod, inode, None)?;
            attr.st_mode &= !SET_ID_BITS;
        }
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            self.check(Op::Chown, inode, None)?;
            // Only "to the sandbox user" is meaningful: it is the host user outside.
            if valid.contains(SetattrValid::UID) {
                if attr.st_uid != self.ids.guest.0 {
                    return Err(eperm());
                }
                attr.st_uid = self.ids.host.0;
            }
            if valid.contains(SetattrValid::GID) {
                if attr.st_gid != self.ids.guest.1 {
                    return Err(eperm());
                }
                attr.st_gid = self.ids.host.1;
            }
        }
        let before = valid
            .contains(SetattrValid::SIZE)
            .then(|| self.quota_stat(ctx, inode, handle))
            .flatten();
        let (mut st, d) = self
            .inner
            .setattr(&host_ctx(ctx), inode, attr, handle, valid)?;
        if let (Some(q), Some(b)) = (&self.quota, &before) {
            q.add(b, &st);
        }
        self.map_out(&mut st);
        Ok((st, d))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(&host_ctx(ctx), inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        name_ok(name, false)?;
        if linkname.to_bytes().len() > 4095 {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        self.check(Op::Create, parent, Some(name))?;
        let e = self.inner.symlink(&host_ctx(ctx), linkname, parent, name)?;
        Ok(self.entry_out(e, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        name_ok(name, false)?;
        // No device nodes on the host, whatever Airlock's privileges.
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(eperm()),
        }
        self.check(Op::Create, parent, Some(name))?;
        let e = self.inner.mknod(
            &host_ctx(ctx),
            parent,
            name,
            mode & !SET_ID_BITS,
            rdev,
            umask,
        )?;
        Ok(self.entry_out(e, parent, name))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        name_ok(name, false)?;
        self.check(Op::Mkdir, parent, Some(name))?;
        let e = self
            .inner
            .mkdir(&host_ctx(ctx), parent, name, mode, umask)?;
        Ok(self.entry_out(e, parent, name))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        name_ok(name, false)?;
        self.check(Op::Remove, parent, Some(name))?;
        let freed = self.last_name_stat(ctx, parent, name);
        self.inner.unlink(&host_ctx(ctx), parent, name)?;
        self.credit(freed);
        Ok(())
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        name_ok(name, false)?;
        self.check(Op::Remove, parent, Some(name))?;
        self.check_below(Op::Remove, parent, name)?;
        self.inner.rmdir(&host_ctx(ctx), parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        name_ok(oldname, false)?;
        name_ok(newname, false)?;
        // One rename at a time from check to path-table update, so a concurrent rename of an
        // ancestor cannot slip between them and make a check use a name that no longer holds.
        let _one = self.renames.lock().unwrap();
        self.check(Op::Rename, olddir, Some(oldname))?;
        self.check(Op::Rename, newdir, Some(newname))?;
        // Whatever is below the old name leaves it, and whatever is below a directory renamed
        // over (or exchanged with) the new name leaves that.
        self.check_below(Op::Rename, olddir, oldname)?;
        self.check_below(Op::Rename, newdir, newname)?;
        let replaced = (flags & libc::RENAME_EXCHANGE == 0)
            .then(|| self.last_name_stat(ctx, newdir, newname))
            .flatten();
        self.inner
            .rename(&host_ctx(ctx), olddir, oldname, newdir, newname, flags)?;
        self.credit(replaced);
        if self.tracking() {
            let mut paths = self.paths.lock().unwrap();
            if flags & libc::RENAME_EXCHANGE != 0 {
                paths.exchanged(olddir, oldname.to_bytes(), newdir, newname.to_bytes());
            } else {
                paths.renamed(olddir, oldname.to_bytes(), newdir, newname.to_bytes());
            }
        }
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        name_ok(newname, false)?;
        self.check(Op::Create, newparent, Some(newname))?;
        // A new name for a file the rules protect would be a way around them.
        self.check(Op::Write, inode, None)?;
        let e = self.inner.link(&host_ctx(ctx), inode, newparent, newname)?;
        Ok(self.entry_out(e, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let f = flags as i32;
        let acc = f & libc::O_ACCMODE;
        let writes = acc != libc::O_RDONLY || f & libc::O_TRUNC != 0;
        if writes {
            self.writable()?;
        }
        let (st, _) = self.inner.getattr(&host_ctx(ctx), inode, None)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(eacces());
        }
        if acc != libc::O_WRONLY {
            self.check(Op::Read, inode, None)?;
        }
        if writes {
            self.check(Op::Write, inode, None)?;
        }
        let r = self.inner.open(&host_ctx(ctx), inode, flags, fuse_flags)?;
        // O_TRUNC frees what the file held.
        if let (Some(q), true) = (&self.quota, f & libc::O_TRUNC != 0) {
            if let Some(after) = self.quota_stat(ctx, inode, None) {
                q.add(&st, &after);
            }
        }
        Ok(r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        name_ok(name, false)?;
        self.check(Op::Create, parent, Some(name))?;
        // CREATE on an existing name opens it: where writing is denied, only a new file may be
        // made.
        if self.would_deny(Op::Write, parent, name) {
            args.flags |= libc::O_EXCL as u32;
        }
        args.mode &= !SET_ID_BITS;
        let (e, h, o, p) = self.inner.create(&host_ctx(ctx), parent, name, args)?;
        Ok((self.entry_out(e, parent, name), h, o, p))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(
            &host_ctx(ctx),
            inode,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let before = self.quota_stat(ctx, inode, Some(handle));
        if let (Some(q), Some(b)) = (&self.quota, &before) {
            // Rewriting bytes a fully allocated file already has needs no room.
            let end = offset.saturating_add(size as u64);
            let overwrite =
                end <= b.st_size as u64 && (b.st_blocks as u64) * 512 >= b.st_size as u64;
            if !overwrite && q.would_exceed(size as u64) {
                return Err(enospc());
            }
        }
        let n = self.inner.write(
            &host_ctx(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )?;
        if let (Some(q), Some(b)) = (&self.quota, &before) {
            if let Some(a) = self.quota_stat(ctx, inode, Some(handle)) {
                q.add(b, &a);
            }
        }
        Ok(n)
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(&host_ctx(ctx), inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(&host_ctx(ctx), inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        let before = self.quota_stat(ctx, inode, Some(handle));
        if let Some(q) = &self.quota {
            if mode & libc::FALLOC_FL_PUNCH_HOLE as u32 == 0 && q.would_exceed(length) {
                return Err(enospc());
            }
        }
        self.inner
            .fallocate(&host_ctx(ctx), inode, handle, mode, offset, length)?;
        if let (Some(q), Some(b)) = (&self.quota, &before) {
            if let Some(a) = self.quota_stat(ctx, inode, Some(handle)) {
                q.add(b, &a);
            }
        }
        Ok(())
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(
            &host_ctx(ctx),
            inode,
            flags,
            handle,
            flush,
            flock_release,
            lock_owner,
        )
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(&host_ctx(ctx), inode)?;
        if let Some(q) = &self.quota {
            // The share's own room: the limit as its size, what the guest added as used, and
            // never more free than the host disk really has.
            let bsize = if st.f_frsize > 0 {
                st.f_frsize
            } else {
                st.f_bsize.max(1)
            };
            let total = q.limit / bsize;
            let free = total.saturating_sub(q.used().div_ceil(bsize));
            st.f_blocks = total;
            st.f_bfree = free.min(st.f_bfree);
            st.f_bavail = free.min(st.f_bavail);
        }
        Ok(st)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.check(Op::List, inode, None)?;
        self.inner.opendir(&host_ctx(ctx), inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(&host_ctx(ctx), inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdirplus(
            &host_ctx(ctx),
            inode,
            handle,
            size,
            offset,
            &mut |d: DirEntry, mut e: Entry| {
                self.map_out(&mut e.attr);
                if self.tracking() && e.inode != 0 {
                    self.paths.lock().unwrap().remember(e.inode, inode, d.name);
                }
                add_entry(d, e)
            },
        )
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(&host_ctx(ctx), inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(&host_ctx(ctx), inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(&host_ctx(ctx), inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner
            .lseek(&host_ctx(ctx), inode, handle, offset, whence)
    }
}

/// A shareable handle (the server needs `Arc`).
pub type SharedGuard = Arc<GuardFs>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(bad_name(b"", true).is_some());
        assert!(bad_name(b"a/b", true).is_some());
        assert!(bad_name(b"..", false).is_some());
        assert!(bad_name(b"..", true).is_none());
        assert!(bad_name(&[b'a'; 256], false).is_some());
        assert!(bad_name(b"ok\xff", false).is_none());
    }

    #[test]
    fn path_table_follows_renames_and_forgets() {
        let mut t = PathTable::default();
        t.remember(2, ROOT, b"a");
        t.remember(3, 2, b"b");
        assert_eq!(t.path(3).unwrap(), b"/a/b");
        t.renamed(ROOT, b"a", ROOT, b"z");
        assert_eq!(t.path(3).unwrap(), b"/z/b");
        // A ".." lookup is one more reference to the parent, not a new name.
        t.remember(2, 3, b"..");
        assert_eq!(t.path(3).unwrap(), b"/z/b");
        t.forget(2, 1);
        assert_eq!(t.path(3).unwrap(), b"/z/b");
        t.forget(2, 1);
        assert!(t.path(3).is_none(), "unknown parent fails closed");
        // A hostile cycle ends.
        t.remember(5, 6, b"x");
        t.remember(6, 5, b"y");
        assert!(t.path(5).is_none());
    }
}
