//! The part of an OCI runtime bundle (`config.json`) Airlock honours, and the checks that
//! refuse what a VM cannot give (host devices) before anything starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use airlock_sandbox::{ExecSpec, WinSize};
use serde::Deserialize;

use crate::error::ShimError;

/// Largest `config.json` read (a real one is a few KiB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Annotation saying whether a CRI container is the pod sandbox or a container in it.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation naming the pod sandbox of a CRI container.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The subset of an OCI runtime spec the shim reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spec {
    /// The container's process.
    pub process: Option<Process>,
    /// Its root filesystem.
    pub root: Option<Root>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Annotations (Airlock policy, CRI pod membership).
    pub annotations: HashMap<String, String>,
    /// Linux specifics (host devices are refused).
    pub linux: Option<Linux>,
    /// Mounts; bind mounts of host paths become volumes in the container's root.
    pub mounts: Vec<Mount>,
}

/// One entry of `mounts`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Mount {
    /// Where, inside the container.
    pub destination: String,
    /// Filesystem type (`bind`, `proc`, `tmpfs`...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Host path for binds.
    pub source: String,
    /// Mount options (`rbind`, `ro`...).
    pub options: Vec<String>,
}

/// `process` of an OCI spec (also the payload of an exec).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Process {
    /// Allocate a terminal.
    pub terminal: bool,
    /// Its initial size.
    pub console_size: Option<ConsoleSize>,
    /// Who it runs as.
    pub user: User,
    /// Program and arguments.
    pub args: Vec<String>,
    /// `NAME=VALUE` entries.
    pub env: Vec<String>,
    /// Working directory inside the root.
    pub cwd: String,
}

/// Terminal size.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct ConsoleSize {
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// The numeric identity of the process.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

/// `root` of an OCI spec.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Root {
    /// Path, relative to the bundle or absolute.
    pub path: String,
}

/// `linux` of an OCI spec: only what is refused is read.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Linux {
    /// Host device nodes to create in the container.
    pub devices: Vec<serde_json::Value>,
}

impl Spec {
    /// Reads and checks `BUNDLE/config.json`.
    pub fn load(bundle: &Path) -> Result<Spec, ShimError> {
        use std::io::Read;
        let path = bundle.join("config.json");
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES).read_to_string(&mut text))
            .map_err(|e| ShimError::Invalid(format!("{}: {e}", path.display())))?;
        let spec: Spec = serde_json::from_str(&text)
            .map_err(|e| ShimError::Invalid(format!("{}: {e}", path.display())))?;
        spec.check()?;
        Ok(spec)
    }

    /// Refuses what an Airlock VM cannot provide.
    fn check(&self) -> Result<(), ShimError> {
        let p = self
            .process
            .as_ref()
            .ok_or_else(|| ShimError::Invalid("the OCI spec has no process".into()))?;
        if p.args.is_empty() || p.args[0].is_empty() {
            return Err(ShimError::Invalid(
                "the OCI spec's process has no args".into(),
            ));
        }
        if self.linux.as_ref().is_some_and(|l| !l.devices.is_empty()) {
            return Err(ShimError::Invalid(
                "host devices (privileged containers, --device) cannot be given to an Airlock \
                 VM: the guest has its own kernel and sees no host device"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The root filesystem directory of the bundle.
    pub fn rootfs(&self, bundle: &Path) -> PathBuf {
        let p = self
            .root
            .as_ref()
            .map(|r| r.path.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("rootfs");
        bundle.join(p)
    }

    /// Whether this container starts a pod (a CRI sandbox, or any container outside CRI:
    /// `ctr run` is a pod of one), and the pod's id.
    pub fn pod(&self, id: &str) -> (bool, String) {
        match self.annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) {
            Some("container") => (
                false,
                self.annotations
                    .get(CRI_SANDBOX_ID)
                    .cloned()
                    .unwrap_or_else(|| id.to_string()),
            ),
            _ => (true, id.to_string()),
        }
    }
}

/// Splits `NAME=VALUE` entries (an entry without `=` is a name with an empty value).
pub fn env_pairs(env: &[String]) -> Vec<(String, String)> {
    env.iter()
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.clone(), String::new()),
        })
        .collect()
}

/// The guest command for `p`, run chrooted at `root`; `drop_env` names variables the guest
/// must not get from the spec (secrets: the agent's base environment holds their placeholders).
pub fn exec_spec(p: &Process, root: &str, stdin: bool, drop_env: &[String]) -> ExecSpec {
    let env = env_pairs(&p.env)
        .into_iter()
        .filter(|(k, _)| !drop_env.contains(k))
        .collect();
    let tty = p.terminal.then(|| {
        let s = p.console_size.unwrap_or_default();
        WinSize {
            rows: if s.height == 0 {
                24
            } else {
                s.height.min(u16::MAX as u32) as u16
            },
            cols: if s.width == 0 {
                80
            } else {
                s.width.min(u16::MAX as u32) as u16
            },
        }
    });
    ExecSpec {
        argv: p.args.clone(),
        env,
        cwd: Some(if p.cwd.is_empty() {
            "/".into()
        } else {
            p.cwd.clone()
        }),
        user: Some(format!("{}:{}", p.user.uid, p.user.gid)),
        tty,
        stdin,
        root: Some(root.to_string()),
        ..Default::default()
    }
}

/// containerd ids are `[A-Za-z0-9][A-Za-z0-9_.-]{0,75}`; they name host and guest paths.
pub fn check_id(id: &str) -> Result<(), ShimError> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ShimError::Invalid(format!("bad container id {id:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_host_devices_and_empty_processes() {
        let ok: Spec = serde_json::from_str(r#"{"process":{"args":["sh"]}}"#).unwrap();
        assert!(ok.check().is_ok());
        let dev: Spec = serde_json::from_str(
            r#"{"process":{"args":["sh"]},"linux":{"devices":[{"path":"/dev/kvm","type":"c"}]}}"#,
        )
        .unwrap();
        assert!(dev
            .check()
            .unwrap_err()
            .to_string()
            .contains("host devices"));
        let none: Spec = serde_json::from_str(r#"{"process":{"args":[]}}"#).unwrap();
        assert!(none.check().is_err());
    }

    #[test]
    fn pods_from_cri_annotations() {
        let s: Spec = serde_json::from_str(
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(s.pod("c1"), (false, "pod1".to_string()));
        assert_eq!(Spec::default().pod("c1"), (true, "c1".to_string()));
    }

    #[test]
    fn exec_specs_drop_secret_env() {
        let p = Process {
            args: vec!["sh".into()],
            env: vec!["A=1".into(), "KEY=real".into(), "B".into()],
            user: User { uid: 5, gid: 6 },
            ..Default::default()
        };
        let e = exec_spec(&p, "/c/x", false, &["KEY".into()]);
        assert_eq!(
            e.env,
            vec![("A".into(), "1".into()), ("B".into(), String::new())]
        );
        assert_eq!(e.user.as_deref(), Some("5:6"));
        assert_eq!(e.cwd.as_deref(), Some("/"));
        assert_eq!(e.root.as_deref(), Some("/c/x"));
    }

    #[test]
    fn ids() {
        assert!(check_id("abc-1.2_3").is_ok());
        for bad in ["", "../x", "a/b", ".x", &"a".repeat(77)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
