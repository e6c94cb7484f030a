//! Processes started for the host: spawning, stdio pumping with flow control, reaping.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use airlock_proto::{
    ExecError, ExecErrorKind, ExecRequest, ExitStatus, Frame, Kind, SignalRequest, Started,
    WinSize, Window, MAX_CHUNK,
};

use crate::{log, user, Tx};

/// Longest a process's Started frame waits for its output or exit to travel with.
const STARTED_DELAY_MS: i32 = 10;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub(crate) enum StdinMsg {
    Data(Vec<u8>),
    Eof,
}

pub(crate) struct Progress {
    pub(crate) exit: Option<ExitStatus>,
    readers_left: usize,
    pub(crate) done: bool,
}

/// One running exec (or builtin / file operation, which have pid 0).
pub(crate) struct Entry {
    pub(crate) stream: u32,
    pid: i32,
    /// Our window towards the host (stdout + stderr share it).
    pub(crate) out: Mutex<Window>,
    pub(crate) out_cv: Condvar,
    /// The host's window towards us, checked on arrival.
    stdin_window: Mutex<Window>,
    stdin: Mutex<Option<Sender<StdinMsg>>>,
    pty: Option<Arc<OwnedFd>>,
    pub(crate) progress: Mutex<Progress>,
    /// A process-less entry was signalled: stop its work.
    pub(crate) cancelled: std::sync::atomic::AtomicBool,
    /// The pid of a process whose Started frame is not sent yet (see [`Registry::announce`]).
    unannounced: Mutex<Option<u32>>,
}

/// Whether the guest kernel's OOM killer chose `pid`: its log says "Killed process PID (".
/// The kernel tells no one else (our minimal kernel has no `oom_kill` count in /proc/vmstat,
/// and commands run in no memory cgroup). Called only for deaths by SIGKILL.
fn oom_killed(pid: i32) -> bool {
    const SYSLOG_ACTION_READ_ALL: i32 = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: i32 = 10;
    let needle = format!("Killed process {pid} (");
    // The victim may die on another CPU before the killer's line is printed: look twice.
    for _ in 0..2 {
        // SAFETY: SIZE_BUFFER takes no buffer.
        let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
        if size <= 0 {
            return false;
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf is valid for `size` bytes.
        let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), size) };
        if n > 0
            && buf[..n as usize]
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

impl Entry {
    /// A process-less entry (builtin, file operation) with stdin attached.
    pub(crate) fn builtin(stream: u32) -> (Arc<Entry>, std::sync::mpsc::Receiver<StdinMsg>) {
        let (stdin_tx, stdin_rx) = channel::<StdinMsg>();
        let e = Arc::new(Entry {
            stream,
            pid: 0,
            out: Mutex::new(Window::default()),
            out_cv: Condvar::new(),
            stdin_window: Mutex::new(Window::default()),
            stdin: Mutex::new(Some(stdin_tx)),
            pty: None,
            progress: Mutex::new(Progress {
                exit: None,
                readers_left: 0,
                done: false,
            }),
            cancelled: Default::default(),
            unannounced: Mutex::new(None),
        });
        (e, stdin_rx)
    }
}

/// All execs, by stream id and by pid.
pub struct Registry {
    pub(crate) tx: Tx,
    pub(crate) by_stream: Mutex<HashMap<u32, Arc<Entry>>>,
    /// Held across fork+register so the reaper never sees a child it cannot attribute.
    by_pid: Mutex<HashMap<i32, Arc<Entry>>>,
    have_children: Condvar,
    /// Bumped under `by_pid` at every spawn, so the reaper cannot miss a wake-up.
    spawned: std::sync::atomic::AtomicU64,
}

impl Registry {
    pub fn new(tx: Tx) -> Registry {
        Registry {
            tx,
            by_stream: Mutex::new(HashMap::new()),
            by_pid: Mutex::new(HashMap::new()),
            have_children: Condvar::new(),
            spawned: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn fail(&self, stream: u32, kind: ExecErrorKind, message: String) {
        self.tx.send(Frame::json(
            Kind::ExecFailed,
            stream,
            &ExecError { kind, message },
        ));
    }

    /// Handles an Exec frame: starts the process or answers ExecFailed.
    pub fn start(self: &Arc<Self>, stream: u32, frame: &Frame, hostname: &str) {
        if self.by_stream.lock().unwrap().contains_key(&stream) {
            return self.fail(
                stream,
                ExecErrorKind::Invalid,
                format!("stream {stream} is already in use"),
            );
        }
        let req: ExecRequest = match frame.parse() {
            Ok(r) => r,
            Err(e) => return self.fail(stream, ExecErrorKind::Invalid, e.to_string()),
        };
        let res = match req.builtin.as_deref() {
            None => self.spawn(stream, req, hostname),
            Some("apply-layer") if crate::setup::is_builder() => {
                self.builtin_input(stream, "apply-layer", |r| {
                    airlock_guest::unpack::apply_layer(r, std::path::Path::new("/")).map(drop)
                });
                Ok(())
            }
            Some("copy-in") if req.argv.len() == 1 => {
                let dest = req.argv[0].clone();
                self.builtin_input(stream, "copy-in", move |r| {
                    crate::shares::copy_in(r, std::path::Path::new(&dest))
                });
                Ok(())
            }
            Some("share-diff") => {
                self.builtin_output(stream, crate::shares::diff);
                Ok(())
            }
            Some("root-diff") => {
                self.builtin_output(stream, crate::setup::root_diff);
                Ok(())
            }
            Some("ps") => {
                self.builtin_output(stream, |out| {
                    airlock_guest::procs::write_processes(std::path::Path::new("/proc"), out)
                });
                Ok(())
            }
            Some("reap") => {
                self.builtin_output(stream, |_| crate::setup::kill_all_processes());
                Ok(())
            }
            Some("copy-out") if req.argv.len() == 1 => {
                let path = req.argv[0].clone();
                self.builtin_output(stream, move |out| crate::shares::copy_out(&path, out));
                Ok(())
            }
            Some(b) => Err((
                ExecErrorKind::Invalid,
                format!("builtin {b:?} is not available in this VM"),
            )),
        };
        if let Err((kind, msg)) = res {
            self.fail(stream, kind, msg);
        }
    }

    fn spawn(
        self: &Arc<Self>,
        stream: u32,
        req: ExecRequest,
        hostname: &str,
    ) -> Result<(), (ExecErrorKind, String)> {
        let invalid = |m: String| (ExecErrorKind::Invalid, m);
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(invalid("no command given".into()));
        }
        if req
            .argv
            .iter()
            .chain(req.env.iter().flat_map(|(k, v)| [k, v]))
            .any(|s| s.contains('\0'))
        {
            return Err(invalid(
                "arguments and environment must not contain NUL bytes".into(),
            ));
        }
        if req.env.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(invalid(
                "environment names must be non-empty and contain no '='".into(),
            ));
        }
        // A container's root: its mounts first, then user and cwd resolved inside it.
        let chroot = req.root.clone().unwrap_or_default();
        if !chroot.is_empty() {
            crate::roots::prepare(&chroot).map_err(invalid)?;
        }
        let id = user::resolve_in(&chroot, req.user.as_deref().unwrap_or("")).map_err(invalid)?;

        let cwd = req
            .cwd
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "/".into());
        if !cwd.starts_with('/') {
            return Err(invalid(format!("working directory {cwd} is not absolute")));
        }
        let host_cwd = format!("{chroot}{cwd}");
        if std::fs::metadata(&host_cwd).is_err() {
            std::fs::create_dir_all(&host_cwd)
                .map_err(|e| invalid(format!("cannot create working directory {cwd}: {e}")))?;
            let _ = std::os::unix::fs::chown(&host_cwd, Some(id.uid), Some(id.gid));
        }

        let mut env: std::collections::BTreeMap<String, String> = [
            ("PATH", DEFAULT_PATH),
            ("HOSTNAME", hostname),
            ("HOME", &id.home),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if req.tty.is_some() {
            env.insert("TERM".into(), "xterm".into());
        }
        for (k, v) in crate::net::base_env().iter().chain(&req.env) {
            env.insert(k.clone(), v.clone());
        }
        let not_found = || {
            (
                ExecErrorKind::NotFound,
                format!(
                    "exec: \"{}\": executable file not found in $PATH",
                    req.argv[0]
                ),
            )
        };

        let root = id.uid == 0 && id.gid == 0 && id.groups.iter().all(|g| *g == 0);
        if req.tty.is_none() && root && chroot.is_empty() && fast_spawn_allowed() {
            let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
            let program = crate::spawn::find_program(&req.argv[0], path).ok_or_else(not_found)?;
            let envs: Vec<(String, String)> = env.clone().into_iter().collect();
            let by_pid = self.by_pid.lock().unwrap();
            match crate::spawn::spawn(&program, &req.argv, &envs, &cwd, req.stdin) {
                Ok(sp) => {
                    let pipes = vec![
                        (Kind::Stdout, File::from(sp.stdout)),
                        (Kind::Stderr, File::from(sp.stderr)),
                    ];
                    let stdin_sink = sp.stdin.map(File::from);
                    return self.started(stream, sp.pid, pipes, stdin_sink, None, by_pid);
                }
                // A script without `#!`: execvp's shell fallback, through Command below.
                Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {}
                Err(e) => {
                    return Err(match e.kind() {
                        std::io::ErrorKind::NotFound => not_found(),
                        std::io::ErrorKind::PermissionDenied => (
                            ExecErrorKind::PermissionDenied,
                            format!("exec: \"{}\": {e}", req.argv[0]),
                        ),
                        _ => (
                            ExecErrorKind::Other,
                            format!("exec: \"{}\": {e}", req.argv[0]),
                        ),
                    })
                }
            }
        }

        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..]).env_clear().envs(&env);
        // In an exec root the child enters it itself (chroot, then chdir) before exec, so
        // the program is looked up on PATH inside the root.
        let enter = if chroot.is_empty() {
            cmd.current_dir(&cwd);
            None
        } else {
            let c = |s: &str| {
                std::ffi::CString::new(s.as_bytes()).map_err(|_| invalid("NUL in a path".into()))
            };
            Some((c(&chroot)?, c(&cwd)?))
        };

        let mut pty_master = None;
        let mut pipes: Vec<(Kind, File)> = Vec::new();
        let mut stdin_sink: Option<File> = None;
        let tty = req.tty;
        if let Some(ws) = tty {
            let pty = nix::pty::openpty(Some(&winsize(ws)), None)
                .map_err(|e| (ExecErrorKind::Other, format!("openpty: {e}")))?;
            // openpty's fds are inheritable: without this every command started while this
            // one runs (and this one) would hold the master and slave open.
            for fd in [&pty.master, &pty.slave] {
                let _ = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
            }
            let slave = pty.slave;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| (ExecErrorKind::Other, format!("dup pty: {e}")))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            let master = Arc::new(pty.master);
            pty_master = Some(master);
        } else {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }

        let (uid, gid, groups) = (id.uid, id.gid, id.groups.clone());
        // Once the agent itself has given them up, every child starts without them.
        let drop_in_child =
            !PRIVILEGED.load(std::sync::atomic::Ordering::Relaxed) && !RESTRICTED.get();
        // SAFETY: only async-signal-safe syscalls run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((root, dir)) = &enter {
                    if libc::chroot(root.as_ptr()) < 0 || libc::chdir(dir.as_ptr()) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if tty.is_some() && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if drop_in_child {
                    drop_privileges()?;
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let by_pid = self.by_pid.lock().unwrap();
        let mut child = cmd.spawn().map_err(|e| {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound => ExecErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ExecErrorKind::PermissionDenied,
                _ => ExecErrorKind::Other,
            };
            match kind {
                ExecErrorKind::NotFound => not_found(),
                _ => (kind, format!("exec: \"{}\": {e}", req.argv[0])),
            }
        })?;
        drop(cmd); // closes our copies of the pty slave
        let pid = child.id() as i32;
        if let Some(m) = &pty_master {
            let fd = m
                .try_clone()
                .map_err(|e| (ExecErrorKind::Other, format!("dup pty: {e}")))?;
            pipes.push((Kind::Stdout, File::from(fd)));
            if req.stdin {
                let fd = m
                    .try_clone()
                    .map_err(|e| (ExecErrorKind::Other, format!("dup pty: {e}")))?;
                stdin_sink = Some(File::from(fd));
            }
        } else {
            if let Some(o) = child.stdout.take() {
                pipes.push((Kind::Stdout, File::from(OwnedFd::from(o))));
            }
            if let Some(e) = child.stderr.take() {
                pipes.push((Kind::Stderr, File::from(OwnedFd::from(e))));
            }
            stdin_sink = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
        }

        self.started(stream, pid, pipes, stdin_sink, pty_master, by_pid)
    }

    /// Registers a spawned command (under the `by_pid` lock, so the reaper cannot miss it),
    /// tells the host, and starts its pumps.
    fn started(
        self: &Arc<Self>,
        stream: u32,
        pid: i32,
        pipes: Vec<(Kind, File)>,
        stdin_sink: Option<File>,
        pty_master: Option<Arc<OwnedFd>>,
        mut by_pid: std::sync::MutexGuard<'_, HashMap<i32, Arc<Entry>>>,
    ) -> Result<(), (ExecErrorKind, String)> {
        let (stdin_tx, stdin_rx) = channel::<StdinMsg>();
        let entry = Arc::new(Entry {
            stream,
            pid,
            out: Mutex::new(Window::default()),
            out_cv: Condvar::new(),
            stdin_window: Mutex::new(Window::default()),
            stdin: Mutex::new(stdin_sink.as_ref().map(|_| stdin_tx)),
            pty: pty_master,
            progress: Mutex::new(Progress {
                exit: None,
                readers_left: pipes.len(),
                done: false,
            }),
            cancelled: Default::default(),
            // Sent by the first of: output, exit, or a pump's short wait running out.
            unannounced: Mutex::new(Some(pid as u32)),
        });
        by_pid.insert(pid, entry.clone());
        self.spawned
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.by_stream.lock().unwrap().insert(stream, entry.clone());
        drop(by_pid);
        self.have_children.notify_all();

        for (kind, file) in pipes {
            let (reg, e) = (self.clone(), entry.clone());
            crate::workers::run(move || reg.pump_output(&e, kind, file));
        }
        if let Some(sink) = stdin_sink {
            let (reg, e) = (self.clone(), entry.clone());
            crate::workers::run(move || reg.pump_stdin(&e, sink, stdin_rx));
        }
        Ok(())
    }

    /// Runs an in-agent builtin whose output streams to the host like a process's: `f` writes
    /// stdout into a pipe pumped within the stream's window; an error goes to stderr, exit 1.
    fn builtin_output<F>(self: &Arc<Self>, stream: u32, f: F)
    where
        F: FnOnce(&mut File) -> Result<(), String> + Send + 'static,
    {
        let pipes = (nix::unistd::pipe(), nix::unistd::pipe());
        let ((out_r, out_w), (err_r, err_w)) = match pipes {
            (Ok(o), Ok(e)) => (o, e),
            _ => return self.fail(stream, ExecErrorKind::Other, "pipe failed".into()),
        };
        let entry = Arc::new(Entry {
            stream,
            pid: 0,
            out: Mutex::new(Window::default()),
            out_cv: Condvar::new(),
            stdin_window: Mutex::new(Window::default()),
            stdin: Mutex::new(None),
            pty: None,
            cancelled: Default::default(),
            progress: Mutex::new(Progress {
                exit: None,
                readers_left: 2,
                done: false,
            }),
            unannounced: Mutex::new(None),
        });
        self.by_stream.lock().unwrap().insert(stream, entry.clone());
        self.tx
            .send(Frame::json(Kind::Started, stream, &Started { pid: 0 }));
        for (kind, fd) in [(Kind::Stdout, out_r), (Kind::Stderr, err_r)] {
            let (reg, e) = (self.clone(), entry.clone());
            crate::workers::run(move || reg.pump_output(&e, kind, File::from(fd)));
        }
        let reg = self.clone();
        std::thread::spawn(move || {
            let mut out = File::from(out_w);
            let mut err = File::from(err_w);
            let code = match f(&mut out) {
                Ok(()) => 0,
                Err(msg) => {
                    let _ = writeln!(err, "{msg}");
                    1
                }
            };
            drop((out, err));
            let finish = {
                let mut p = entry.progress.lock().unwrap();
                p.exit = Some(ExitStatus {
                    code: Some(code),
                    ..Default::default()
                });
                p.readers_left == 0 && !std::mem::replace(&mut p.done, true)
            };
            if finish {
                reg.finish(&entry);
            }
        });
    }

    /// A builtin that consumes stdin (`apply-layer`: a layer tar applied onto `/`; `copy-in`: a
    /// tar from the host unpacked at a path); an error goes to stderr, exit 1.
    fn builtin_input<F>(self: &Arc<Self>, stream: u32, what: &'static str, f: F)
    where
        F: FnOnce(&mut dyn std::io::Read) -> Result<(), String> + Send + 'static,
    {
        let (entry, stdin_rx) = Entry::builtin(stream);
        self.by_stream.lock().unwrap().insert(stream, entry.clone());
        self.tx
            .send(Frame::json(Kind::Started, stream, &Started { pid: 0 }));
        let reg = self.clone();
        std::thread::spawn(move || {
            let mut input = StdinReader::new(&reg, &entry, stdin_rx);
            let res = f(&mut input);
            // Drain to EOF so a host still sending never waits for credit that cannot come.
            while input.fill() {}
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            let code = match res {
                Ok(_) => 0,
                Err(msg) => {
                    let msg = format!("{what}: {msg}\n").into_bytes();
                    let n = entry.out.lock().unwrap().take(msg.len());
                    reg.tx
                        .send(Frame::new(Kind::Stderr, stream, msg[..n].to_vec()));
                    1
                }
            };
            entry.progress.lock().unwrap().exit = Some(ExitStatus {
                code: Some(code),
                ..Default::default()
            });
            entry.progress.lock().unwrap().done = true;
            reg.finish(&entry);
        });
    }

    /// Sends the process's Started frame unless it went already. Every other frame of the
    /// stream is sent after calling this, and the lock is held while sending, so Started always
    /// comes first. Deferring it lets a short command's Started go out with its Exit in one
    /// write to the channel instead of a write (and a host wake-up) of its own.
    fn announce(&self, e: &Entry) {
        let mut u = e.unannounced.lock().unwrap();
        if let Some(pid) = u.take() {
            self.tx
                .send(Frame::json(Kind::Started, e.stream, &Started { pid }));
        }
    }

    /// Copies one output pipe to the host within the stream's window. After the process has
    /// exited it drains what is buffered and stops, so a background child holding the pipe
    /// cannot keep the exec open.
    fn pump_output(&self, e: &Entry, kind: Kind, mut file: File) {
        let fd = file.as_raw_fd();
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            // Wait for data before reserving window, so an idle pipe (often stderr) never
            // holds credit its busy sibling could use.
            let mut eof = false;
            loop {
                // Until Started is sent, wait only briefly: a silent process is announced
                // within a few ms.
                let pending = e.unannounced.lock().unwrap().is_some();
                if readable(fd, if pending { STARTED_DELAY_MS } else { 100 }) {
                    break;
                }
                if pending {
                    self.announce(e);
                }
                if e.progress.lock().unwrap().exit.is_some() && !readable(fd, 0) {
                    eof = true;
                    break;
                }
            }
            if eof {
                break;
            }
            let want = {
                let mut w = e.out.lock().unwrap();
                while w.available() == 0 {
                    w = e.out_cv.wait(w).unwrap();
                }
                w.take(MAX_CHUNK)
            };
            let n = loop {
                match file.read(&mut buf[..want]) {
                    Ok(n) => break n,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO: the terminal's last slave closed.
                    Err(_) => break 0,
                }
            };
            if n < want {
                let _ = e.out.lock().unwrap().grant((want - n) as u32);
                e.out_cv.notify_all();
            }
            if n == 0 {
                break;
            }
            self.announce(e);
            if !self.tx.send(Frame::new(kind, e.stream, buf[..n].to_vec())) {
                break;
            }
        }
        let finish = {
            let mut p = e.progress.lock().unwrap();
            p.readers_left -= 1;
            p.readers_left == 0 && p.exit.is_some() && !std::mem::replace(&mut p.done, true)
        };
        if finish {
            self.finish(e);
        }
    }

    fn pump_stdin(&self, e: &Entry, mut sink: File, rx: std::sync::mpsc::Receiver<StdinMsg>) {
        let mut broken = false;
        while let Ok(msg) = rx.recv() {
            match msg {
                StdinMsg::Data(d) => {
                    if !broken && sink.write_all(&d).is_err() {
                        // The process closed stdin; keep returning credit so the host never stalls.
                        broken = true;
                    }
                    let _ = e.stdin_window.lock().unwrap().grant(d.len() as u32);
                    self.tx.send(Frame::credit(e.stream, d.len() as u32));
                }
                StdinMsg::Eof => {
                    if e.pty.is_some() && !broken {
                        // A terminal has no half-close: send the EOF character instead.
                        let _ = sink.write_all(&[4]);
                    }
                    break;
                }
            }
        }
    }

    pub(crate) fn finish(&self, e: &Entry) {
        let status = e.progress.lock().unwrap().exit.unwrap_or_default();
        self.by_stream.lock().unwrap().remove(&e.stream);
        *e.stdin.lock().unwrap() = None;
        self.announce(e);
        self.tx.send(Frame::json(Kind::Exit, e.stream, &status));
    }

    /// Whether `stream` is a running exec.
    pub fn owns(&self, stream: u32) -> bool {
        self.by_stream.lock().unwrap().contains_key(&stream)
    }

    /// Handles a host frame for an existing stream.
    pub fn handle(&self, stream: u32, frame: Frame) {
        let Some(e) = self.by_stream.lock().unwrap().get(&stream).cloned() else {
            // Late frames for a finished exec (credit, stdin racing the exit) are normal.
            return;
        };
        match frame.kind {
            Kind::Stdin => {
                if let Err(err) = e.stdin_window.lock().unwrap().receive(frame.payload.len()) {
                    log(&format!("stream {stream}: {err}"));
                    return;
                }
                if let Some(tx) = e.stdin.lock().unwrap().as_ref() {
                    let _ = tx.send(StdinMsg::Data(frame.payload));
                }
            }
            Kind::StdinEof => {
                if let Some(tx) = e.stdin.lock().unwrap().take() {
                    let _ = tx.send(StdinMsg::Eof);
                }
            }
            Kind::Credit => {
                if let Ok(n) = frame.parse_credit() {
                    let mut w = e.out.lock().unwrap();
                    if w.grant(n).is_ok() {
                        e.out_cv.notify_all();
                    }
                }
            }
            Kind::Signal => {
                if e.pid == 0 {
                    // No process: a builtin or file operation the host gave up on.
                    e.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
                    e.out_cv.notify_all();
                    return;
                }
                if let Ok(s) = frame.parse::<SignalRequest>() {
                    if (1..=64).contains(&s.signal) && e.progress.lock().unwrap().exit.is_none() {
                        let target = if s.group { -e.pid } else { e.pid };
                        // SAFETY: kill(2) with a validated signal number.
                        unsafe { libc::kill(target, s.signal) };
                    }
                }
            }
            Kind::Resize => {
                if let (Ok(ws), Some(m)) = (frame.parse::<WinSize>(), &e.pty) {
                    let w = winsize(ws);
                    // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
                    unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &w) };
                }
            }
            other => log(&format!("stream {stream}: unexpected {other:?} from host")),
        }
    }

    /// Reaps every child (PID 1 adopts all orphans) and records the exits of ours.
    pub fn reap_loop(&self) {
        loop {
            // Peek without reaping: std's spawn reaps a child whose exec failed itself, so the
            // zombie is only collected under the lock that spawn holds.
            let generation = self.spawned.load(std::sync::atomic::Ordering::SeqCst);
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid siginfo pointer.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r < 0 {
                // No children: sleep until the next spawn (checked under the lock spawn holds,
                // so its notification cannot slip between the check and the wait).
                let guard = self.by_pid.lock().unwrap();
                if self.spawned.load(std::sync::atomic::Ordering::SeqCst) == generation {
                    let _ = self
                        .have_children
                        .wait_timeout(guard, Duration::from_secs(5))
                        .unwrap();
                }
                continue;
            }
            // SAFETY: waitid filled a SIGCHLD siginfo.
            let pid = unsafe { info.si_pid() };
            let mut by_pid = self.by_pid.lock().unwrap();
            let mut status = 0;
            // SAFETY: waitpid on a specific pid with a valid status pointer.
            let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if got != pid {
                continue;
            }
            let Some(e) = by_pid.remove(&pid) else {
                continue;
            };
            drop(by_pid);
            let exit = if libc::WIFEXITED(status) {
                ExitStatus {
                    code: Some(libc::WEXITSTATUS(status)),
                    ..Default::default()
                }
            } else {
                let signal = libc::WTERMSIG(status);
                ExitStatus {
                    code: None,
                    signal: Some(signal),
                    oom_killed: signal == libc::SIGKILL && oom_killed(pid),
                }
            };
            let finish = {
                let mut p = e.progress.lock().unwrap();
                p.exit = Some(exit);
                p.readers_left == 0 && !std::mem::replace(&mut p.done, true)
            };
            if finish {
                self.finish(&e);
            }
        }
    }
}

/// Stdin of a builtin as a `Read`, returning flow-control credit as it is consumed.
pub(crate) struct StdinReader<'a> {
    reg: &'a Registry,
    e: &'a Entry,
    rx: std::sync::mpsc::Receiver<StdinMsg>,
    buf: Vec<u8>,
    pos: usize,
}

impl<'a> StdinReader<'a> {
    pub(crate) fn new(
        reg: &'a Registry,
        e: &'a Entry,
        rx: std::sync::mpsc::Receiver<StdinMsg>,
    ) -> StdinReader<'a> {
        StdinReader {
            reg,
            e,
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Takes the next chunk; false at end of input.
    pub(crate) fn fill(&mut self) -> bool {
        match self.rx.recv() {
            Ok(StdinMsg::Data(d)) => {
                let _ = self.e.stdin_window.lock().unwrap().grant(d.len() as u32);
                self.reg
                    .tx
                    .send(Frame::credit(self.e.stream, d.len() as u32));
                self.buf = d;
                self.pos = 0;
                true
            }
            Ok(StdinMsg::Eof) | Err(_) => false,
        }
    }
}

impl Read for StdinReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if !self.fill() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn winsize(ws: WinSize) -> libc::winsize {
    libc::winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0
}

/// Whether commands keep every capability and may gain privileges (`--privileged`).
static PRIVILEGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// Whether this thread of the agent has given up [`DROPPED_CAPS`] (bounding, inheritable
    /// and ambient sets) and set no_new_privs, so a child it spawns starts without them and
    /// needs no fork to drop them. Per thread, as Linux keeps these: the serve loop that
    /// handles `Init` is the one that spawns.
    static RESTRICTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Set from the host's `Init` (and `Resume`): without `--privileged` the agent restricts
/// itself once, for good; it keeps its own effective capabilities (it still mounts and powers
/// off), which exec does not pass on past the bounding set.
pub fn set_privileged(on: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    PRIVILEGED.store(on, Relaxed);
    if on && RESTRICTED.get() {
        // The host refuses this (a snapshot taken without --privileged); say so if it comes.
        log(
            "--privileged asked after the agent gave up its capabilities: commands stay restricted",
        );
    }
    if !on && !RESTRICTED.get() {
        match restrict_agent() {
            Ok(()) => RESTRICTED.set(true),
            Err(e) => log(&format!(
                "cannot restrict the agent: {e}; commands drop capabilities each"
            )),
        }
    }
}

/// Whether a command may be spawned without a fork of its own: privileges are already what the
/// child must have (privileged, or the agent restricted).
fn fast_spawn_allowed() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    PRIVILEGED.load(Relaxed) || RESTRICTED.get()
}

/// The agent-wide half of [`drop_privileges`]: the bounding, ambient and inheritable sets and
/// no_new_privs, leaving the agent's own permitted and effective sets; root's supplementary
/// groups become `[0]`, as a command's would.
fn restrict_agent() -> std::io::Result<()> {
    drop_bounding_and_ambient()?;
    // SAFETY: setgroups with a one-element array.
    if unsafe { libc::setgroups(1, [0 as libc::gid_t].as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    set_caps(|d, keep| d.inheritable &= keep)?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Capabilities no workload keeps unless privileged: loading kernel code, raw I/O ports and
/// memory, and rebooting (which would end the sandbox from inside rather than through Airlock).
const DROPPED_CAPS: [u32; 3] = [
    16, // CAP_SYS_MODULE
    17, // CAP_SYS_RAWIO
    22, // CAP_SYS_BOOT
];

/// Runs between fork and exec (async-signal-safe syscalls only): removes [`DROPPED_CAPS`] from
/// the bounding, inheritable and ambient sets (exec recomputes permitted/effective from the
/// bounding set, so they are gone after exec for root too), then sets no_new_privs so no
/// setuid binary or file capability can bring anything back.
fn drop_privileges() -> std::io::Result<()> {
    drop_bounding_and_ambient()?;
    set_caps(|d, keep| {
        d.effective &= keep;
        d.permitted &= keep;
        d.inheritable &= keep;
    })?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes [`DROPPED_CAPS`] from this thread's bounding and ambient sets (async-signal-safe).
fn drop_bounding_and_ambient() -> std::io::Result<()> {
    // SAFETY: prctl with constant arguments.
    unsafe {
        for cap in DROPPED_CAPS {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Ambient capabilities may be unsupported; nothing to drop then.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            );
        }
    }
    Ok(())
}

/// One 32-bit word of each capability set (the kernel's capget/capset ABI v3: two words per
/// set); libc does not define it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Applies `clear(word, keep_mask)` for each of [`DROPPED_CAPS`] to this thread's sets
/// (async-signal-safe: syscalls on stack data only).
fn set_caps(clear: impl Fn(&mut CapData, u32)) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    const V3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset with valid pointers to local, correctly sized structs.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for cap in DROPPED_CAPS {
            clear(&mut data[(cap / 32) as usize], !(1u32 << (cap % 32)));
        }
        if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
