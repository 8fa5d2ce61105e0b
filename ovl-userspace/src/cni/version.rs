//! CNI spec versions: which ones ovl speaks, which commands each allows,
//! and how a result is laid out for each.

use std::{fmt, str::FromStr};

use super::{Command, error::CniError};

/// A spec version, `major.minor.patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpecVersion(u32, u32, u32);

impl SpecVersion {
    /// The newest version ovl speaks; used when the input names none usable.
    pub const NEWEST: SpecVersion = SpecVersion(1, 1, 0);
    /// The `cniVersion` a conflist ovl writes declares: runtimes whose
    /// libcni predates 1.1.0 (podman 4.3, containerd 1.7) refuse a 1.1.0
    /// result ("unsupported CNI result version"), and read no
    /// `cniVersions`, which offers newer ones 1.1.0 (GC, STATUS).
    pub const CONFLIST: SpecVersion = SpecVersion(1, 0, 0);
    /// What an undeclared `cniVersion` means (the key came with 0.2.0).
    const UNDECLARED: SpecVersion = SpecVersion(0, 1, 0);
    /// The first version with CHECK.
    const CHECK_SINCE: SpecVersion = SpecVersion(0, 4, 0);
    /// The first version with GC and STATUS.
    const GC_STATUS_SINCE: SpecVersion = SpecVersion(1, 1, 0);
    /// Results before 1.0.0 carry `version` in each IP entry.
    const CURRENT_LAYOUT_SINCE: SpecVersion = SpecVersion(1, 0, 0);
    /// Interfaces carry mtu, socketPath and pciID, routes mtu, advmss,
    /// priority, table and scope from 1.1.0 on.
    pub const DETAILS_SINCE: SpecVersion = SpecVersion(1, 1, 0);

    /// The versions ovl answers. 0.1.0/0.2.0 are left out: their result
    /// layout (`ip4`/`ip6`) predates interfaces and ovl does not write it.
    pub const SUPPORTED: [SpecVersion; 5] = [
        SpecVersion(0, 3, 0),
        SpecVersion(0, 3, 1),
        SpecVersion(0, 4, 0),
        SpecVersion(1, 0, 0),
        SpecVersion(1, 1, 0),
    ];

    /// The version a configuration declares (`None`: the key is absent).
    pub fn declared(raw: Option<&str>) -> Result<SpecVersion, CniError> {
        match raw {
            None | Some("") => Ok(Self::UNDECLARED),
            Some(v) => v.parse(),
        }
    }

    /// Checks that ovl speaks this version and that it has `command`.
    pub fn check(self, command: Command) -> Result<(), CniError> {
        if !Self::SUPPORTED.contains(&self) {
            let list: Vec<String> = Self::SUPPORTED.iter().map(|v| v.to_string()).collect();
            return Err(CniError::incompatible(format!(
                "the configuration's cniVersion is {self}; ovl supports {}",
                list.join(", ")
            )));
        }
        let since = match command {
            Command::Check => Self::CHECK_SINCE,
            Command::Gc | Command::Status => Self::GC_STATUS_SINCE,
            Command::Add | Command::Del | Command::Version => return Ok(()),
        };
        if self < since {
            return Err(CniError::incompatible(format!(
                "{} needs cniVersion {since} or later; the configuration says {self}",
                command.name()
            )));
        }
        Ok(())
    }

    /// True when results of this version carry `version` in IP entries.
    pub fn legacy_layout(self) -> bool {
        self < Self::CURRENT_LAYOUT_SINCE
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl FromStr for SpecVersion {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, CniError> {
        let bad = || CniError::decode(format!("cniVersion {s:?} is not a version like 1.0.0"));
        let mut parts = s.split('.').map(|p| p.parse::<u32>().map_err(|_| bad()));
        let v = SpecVersion(
            parts.next().ok_or_else(bad)??,
            parts.next().unwrap_or(Ok(0))?,
            parts.next().unwrap_or(Ok(0))?,
        );
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::Code;

    #[test]
    fn versions_parse_and_gate_commands() {
        let v = |s: &str| s.parse::<SpecVersion>().unwrap();
        assert_eq!(v("1.0"), SpecVersion(1, 0, 0));
        assert!(v("1.0.0").check(Command::Add).is_ok());
        assert!(v("0.4.0").check(Command::Check).is_ok());
        assert_eq!(
            v("0.3.1").check(Command::Check).unwrap_err().code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            v("1.0.0").check(Command::Gc).unwrap_err().code,
            Code::IncompatibleVersion
        );
        assert!(v("1.1.0").check(Command::Status).is_ok());
        assert_eq!(
            v("9.9.9").check(Command::Add).unwrap_err().code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            SpecVersion::declared(None)
                .unwrap()
                .check(Command::Add)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        for bad in ["", "x", "1.x", "1.0.0.0", "-1"] {
            assert_eq!(
                bad.parse::<SpecVersion>().unwrap_err().code,
                Code::Decode,
                "{bad}"
            );
        }
        assert!(v("0.4.0").legacy_layout() && !v("1.0.0").legacy_layout());
    }
}
