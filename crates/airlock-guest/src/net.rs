//! The guest's network: a static address on eth0, a default route to Airlock's gateway, the
//! gateway as the only DNS server, and trust in Airlock's interception CA.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use airlock_proto::NetInit;

/// Environment every exec gets below its own (placeholders, CA bundle variables).
static BASE_ENV: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The base environment for execs.
pub fn base_env() -> Vec<(String, String)> {
    BASE_ENV.lock().unwrap().clone()
}

/// Adds to the base environment.
pub fn extend_env(vars: impl IntoIterator<Item = (String, String)>) {
    let mut env = BASE_ENV.lock().unwrap();
    for (k, v) in vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            continue;
        }
        env.retain(|(x, _)| *x != k);
        env.push((k, v));
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; a plain bit copy.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `struct rtentry` from <net/route.h>: the libc crate has it for musl only, not glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        ifr.ifr_name[i] = b as libc::c_char;
    }
    ifr
}

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// The configuration [`configure`] last applied in full.
static CONFIGURED: std::sync::Mutex<Option<NetInit>> = std::sync::Mutex::new(None);

/// Brings up eth0 with `cfg` and points DNS at the gateway. A configuration applied already
/// (a pooled VM's warm-up did; a restored snapshot's kernel and disk keep it) is not redone.
pub fn configure(cfg: &NetInit) -> Result<(), String> {
    let mut done = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
    if done.as_ref() == Some(cfg) {
        return Ok(());
    }
    apply(cfg)?;
    *done = Some(cfg.clone());
    Ok(())
}

fn apply(cfg: &NetInit) -> Result<(), String> {
    let dev = "eth0";
    // No IPv6 on the NIC: nothing would route it, and clients then fall back to IPv4 at once.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1");
    let mask = if cfg.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - cfg.prefix.min(32) as u32)
    };
    // SAFETY: ioctls on a socket we own, with properly initialised ifreq/rtentry structs.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(fd, "socket")?;
        let res = (|| -> Result<(), String> {
            let mut ifr = ifreq(dev);
            ifr.ifr_ifru.ifru_addr = sockaddr(cfg.address);
            check(libc::ioctl(fd, libc::SIOCSIFADDR, &ifr), "set address")?;
            let mut ifr = ifreq(dev);
            ifr.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
            check(libc::ioctl(fd, libc::SIOCSIFNETMASK, &ifr), "set netmask")?;
            if cfg.mtu > 0 {
                let mut ifr = ifreq(dev);
                ifr.ifr_ifru.ifru_mtu = cfg.mtu as libc::c_int;
                check(libc::ioctl(fd, libc::SIOCSIFMTU, &ifr), "set mtu")?;
            }
            let mut ifr = ifreq(dev);
            check(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), "get flags")?;
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), "bring up")?;
            let mut rt: RtEntry = std::mem::zeroed();
            rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr(cfg.gateway);
            rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
            // A pooled VM's warm-up configured the same route already.
            let r = libc::ioctl(fd, libc::SIOCADDRT, &rt);
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                check(r, "add default route")?;
            }
            Ok(())
        })();
        libc::close(fd);
        res?;
    }
    // resolv.conf may be a symlink into a resolver daemon's runtime dir: replace it.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write(
        "/etc/resolv.conf",
        format!("nameserver {}\noptions single-request\n", cfg.gateway),
    )
    .map_err(|e| format!("write /etc/resolv.conf: {e}"))?;
    Ok(())
}

/// System CA bundles of common distributions (Debian/Ubuntu/Alpine, Fedora/RHEL, openSUSE).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// The CA alone.
pub const CA_FILE: &str = "/etc/ssl/airlock/ca.pem";
/// The system roots plus the CA.
pub const BUNDLE_FILE: &str = "/etc/ssl/airlock/bundle.pem";

/// Root-relative paths the agent wrote into the root (resolv.conf; the CA files and the
/// system bundles it appended to, once a CA was injected): a layer taken of the root by
/// `root-diff` leaves them out.
pub fn agent_written() -> Vec<String> {
    let mut v = vec!["etc/resolv.conf".to_string()];
    if std::path::Path::new(CA_FILE).exists() {
        v.push("etc/ssl/airlock".into());
        for b in SYSTEM_BUNDLES {
            v.push(b.trim_start_matches('/').to_string());
            if let Ok(real) = std::fs::canonicalize(b) {
                v.push(real.to_string_lossy().trim_start_matches('/').to_string());
            }
        }
    }
    v
}

/// What [`trust_ca`] last wrote: each file it added the CA to and how long that file was
/// before (the tail after it is the CA), and the CA.
struct Installed {
    pem: String,
    files: Vec<(std::path::PathBuf, u64)>,
}

static INSTALLED: std::sync::Mutex<Option<Installed>> = std::sync::Mutex::new(None);

/// Makes every TLS client trust `pem`: added to the image's system bundles (in the writable
/// layer; the image is untouched), a combined bundle, and the variables that OpenSSL, Python
/// requests, curl, git and Node read. A CA this agent added before (a pooled VM's throw-away
/// one; a snapshot's, in its copies) is replaced in place, not kept beside the new one.
pub fn trust_ca(pem: &str) -> Result<(), String> {
    let pem = if pem.ends_with('\n') {
        pem.to_string()
    } else {
        format!("{pem}\n")
    };
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    let prev = installed.take();
    std::fs::create_dir_all("/etc/ssl/airlock").map_err(|e| format!("/etc/ssl/airlock: {e}"))?;
    write_in_place(CA_FILE, 0, pem.as_bytes()).map_err(|e| format!("{CA_FILE}: {e}"))?;
    // How long `path` was before a previous CA was added, if that CA is still its tail.
    let kept = |path: &std::path::Path| -> Option<u64> {
        let prev = prev.as_ref()?;
        let &(_, keep) = prev.files.iter().find(|(p, _)| p == path)?;
        let tail = tail_for(keep, &prev.pem);
        let f = std::fs::File::open(path).ok()?;
        let mut buf = vec![0; tail.len()];
        use std::os::unix::fs::FileExt;
        (f.metadata().ok()?.len() == keep + tail.len() as u64
            && f.read_exact_at(&mut buf, keep).is_ok()
            && buf == tail.as_bytes())
        .then_some(keep)
    };
    let mut files = Vec::new();
    let mut system: Option<(std::path::PathBuf, u64)> = None;
    for b in SYSTEM_BUNDLES {
        // Several names are often links to one file: add to each real file once.
        let Ok(real) = std::fs::canonicalize(b) else {
            continue;
        };
        if files.iter().any(|(p, _)| *p == real) {
            continue;
        }
        let Ok(len) = std::fs::metadata(&real).map(|m| m.len()) else {
            continue;
        };
        let keep = kept(&real).unwrap_or(len);
        if write_in_place(&real, keep, tail_for(keep, &pem).as_bytes()).is_ok() {
            system.get_or_insert((real.clone(), keep));
            files.push((real, keep));
        }
    }
    if files.is_empty() {
        let _ = std::fs::create_dir_all("/etc/ssl/certs");
        let path = std::path::PathBuf::from(SYSTEM_BUNDLES[0]);
        if write_in_place(&path, 0, pem.as_bytes()).is_ok() {
            files.push((path, 0));
        }
    }
    // The combined bundle: the first system bundle as the image had it, then the CA.
    let bundle = std::path::Path::new(BUNDLE_FILE);
    let (keep, written) = match kept(bundle) {
        Some(keep) => (
            keep,
            write_in_place(bundle, keep, tail_for(keep, &pem).as_bytes()),
        ),
        None => {
            let mut text = match &system {
                Some((path, len)) => {
                    let mut t = std::fs::read(path).unwrap_or_default();
                    t.truncate(*len as usize);
                    t
                }
                None => Vec::new(),
            };
            let keep = text.len() as u64;
            text.extend_from_slice(tail_for(keep, &pem).as_bytes());
            (keep, write_in_place(bundle, 0, &text))
        }
    };
    written.map_err(|e| format!("{BUNDLE_FILE}: {e}"))?;
    files.push((bundle.to_path_buf(), keep));
    *installed = Some(Installed { pem, files });
    extend_env(
        [
            ("SSL_CERT_FILE", BUNDLE_FILE),
            ("REQUESTS_CA_BUNDLE", BUNDLE_FILE),
            ("CURL_CA_BUNDLE", BUNDLE_FILE),
            ("GIT_SSL_CAINFO", BUNDLE_FILE),
            ("NODE_EXTRA_CA_CERTS", CA_FILE),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Ok(())
}

/// What follows a file's first `keep` bytes once the CA is added: the CA, on a line of its own.
fn tail_for(keep: u64, pem: &str) -> String {
    if keep == 0 {
        pem.to_string()
    } else {
        format!("\n{pem}")
    }
}

/// Makes `path` its first `keep` bytes followed by `tail`, writing over the old bytes in place
/// (no truncation to zero: a file the same length again costs ext4 no block).
pub fn write_in_place(
    path: impl AsRef<std::path::Path>,
    keep: u64,
    tail: &[u8],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(tail, keep)?;
    let len = keep + tail.len() as u64;
    if f.metadata()?.len() != len {
        f.set_len(len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_holds_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        // SAFETY: sockaddr was made from a sockaddr_in of the same size.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(sa) };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(
            u32::from_be(sin.sin_addr.s_addr),
            u32::from(Ipv4Addr::new(10, 0, 2, 15))
        );
    }

    #[test]
    fn ifreq_names_are_truncated_and_terminated() {
        let r = ifreq("eth0");
        assert_eq!(
            r.ifr_name[..5].iter().map(|&c| c as u8).collect::<Vec<_>>(),
            b"eth0\0"
        );
        let long = ifreq(&"x".repeat(40));
        assert_eq!(long.ifr_name[libc::IFNAMSIZ - 1], 0);
    }
}
