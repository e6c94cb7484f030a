//! Choosing the accelerator: KVM only where it is real hardware virtualization.
//!
//! Some hosts expose a `/dev/kvm` that is not VT-x/AMD-V (PVM, for one): it opens, creates
//! VMs, and then cannot run a stock kernel, leaving QEMU paused forever. So KVM is chosen only
//! when /proc/cpuinfo shows `vmx` or `svm` *and* /dev/kvm opens read-write; otherwise TCG.

use std::fmt;
use std::str::FromStr;

/// An accelerator QEMU can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?}: use kvm or tcg")),
        }
    }
}

/// The accelerator chosen and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// What runs.
    pub accel: Accel,
    /// One line a person can act on.
    pub reason: String,
}

/// What the host offers, separated from the decision so the decision can be tested.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// /proc/cpuinfo has vmx or svm.
    pub hw_virt_flag: bool,
    /// /dev/kvm exists.
    pub kvm_exists: bool,
    /// /dev/kvm opens read-write; the error otherwise.
    pub kvm_open: Result<(), String>,
    /// A loaded module name that reveals a paravirtual KVM (e.g. kvm_pvm).
    pub pvm_module: Option<String>,
}

impl HostFacts {
    /// Reads the facts of this host.
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw_virt_flag = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == "vmx" || w == "svm"));
        let kvm_exists = std::path::Path::new("/dev/kvm").exists();
        let kvm_open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| e.to_string());
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        let pvm_module = modules
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .find(|m| m.contains("pvm"))
            .map(String::from);
        HostFacts {
            hw_virt_flag,
            kvm_exists,
            kvm_open,
            pvm_module,
        }
    }
}

/// Decides from `facts`; `forced` (from `--accel` or `AIRLOCK_ACCEL`) wins.
pub fn decide(facts: &HostFacts, forced: Option<Accel>) -> AccelChoice {
    if let Some(a) = forced {
        return AccelChoice {
            accel: a,
            reason: format!("{a} forced by --accel/AIRLOCK_ACCEL"),
        };
    }
    let tcg = |why: String| AccelChoice {
        accel: Accel::Tcg,
        reason: format!("TCG (software emulation): {why}"),
    };
    if !facts.kvm_exists {
        return tcg("no /dev/kvm".into());
    }
    if !facts.hw_virt_flag {
        let what = match &facts.pvm_module {
            Some(m) => format!("/dev/kvm is paravirtual ({m}), no vmx/svm in /proc/cpuinfo; it cannot boot a stock kernel"),
            None => "/dev/kvm exists but /proc/cpuinfo has no vmx/svm flag (no hardware virtualization)".into(),
        };
        return tcg(what);
    }
    if let Err(e) = &facts.kvm_open {
        return tcg(format!(
            "/dev/kvm does not open read-write ({e}); add your user to the kvm group"
        ));
    }
    AccelChoice {
        accel: Accel::Kvm,
        reason: "KVM: hardware virtualization (vmx/svm) and a usable /dev/kvm".into(),
    }
}

/// Probes this host and decides; `forced` wins.
pub fn detect(forced: Option<Accel>) -> AccelChoice {
    decide(&HostFacts::probe(), forced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let real = HostFacts {
            hw_virt_flag: true,
            kvm_exists: true,
            kvm_open: Ok(()),
            pvm_module: None,
        };
        assert_eq!(decide(&real, None).accel, Accel::Kvm);
        assert_eq!(decide(&real, Some(Accel::Tcg)).accel, Accel::Tcg);

        let pvm = HostFacts {
            hw_virt_flag: false,
            pvm_module: Some("kvm_pvm".into()),
            ..real.clone()
        };
        let c = decide(&pvm, None);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);

        let closed = HostFacts {
            kvm_open: Err("Permission denied".into()),
            ..real.clone()
        };
        assert!(decide(&closed, None).reason.contains("kvm group"));

        let none = HostFacts {
            kvm_exists: false,
            ..pvm
        };
        assert!(decide(&none, None).reason.contains("no /dev/kvm"));
        assert_eq!("KVM".parse::<Accel>(), Ok(Accel::Kvm));
        assert!("hvf".parse::<Accel>().is_err());
    }
}
