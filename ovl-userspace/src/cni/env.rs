//! The CNI_* parameters of one invocation, read and checked per command as
//! the spec's tables require (CNI_NETNS optional for DEL, nothing but
//! CNI_COMMAND for VERSION, GC and STATUS).

use std::collections::BTreeMap;

use super::{Command, error::CniError};

/// The kernel's limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// What the runtime passed in the environment.
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub container_id: String,
    /// `None` only for DEL (and the commands that take none).
    pub netns: Option<String>,
    pub ifname: String,
    /// `CNI_ARGS`, split into `KEY=VALUE` pairs.
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads the parameters `command` needs through `get` (the process
    /// environment, or a map in tests). Empty counts as unset.
    pub fn read(
        command: Command,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Invocation, CniError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        if !matches!(command, Command::Add | Command::Del | Command::Check) {
            return Ok(Invocation::default());
        }
        let container_id = get("CNI_CONTAINERID");
        let netns = get("CNI_NETNS");
        let ifname = get("CNI_IFNAME");
        let mut missing = Vec::new();
        if container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if netns.is_none() && command != Command::Del {
            missing.push("CNI_NETNS");
        }
        if ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if !missing.is_empty() {
            return Err(CniError::env(format!(
                "required environment variables [{}] missing for {}",
                missing.join(","),
                command.name()
            )));
        }
        let container_id = container_id.expect("checked above");
        let ifname = ifname.expect("checked above");
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;
        Ok(Invocation {
            container_id,
            netns,
            ifname,
            args: parse_args(get("CNI_ARGS").as_deref())?,
        })
    }

    /// The owner recorded on the endpoint: `cni:<container id>/<ifname>`.
    pub fn owner(&self) -> String {
        owner(&self.container_id, &self.ifname)
    }
}

/// The owner of the attachment (`container_id`, `ifname`).
pub fn owner(container_id: &str, ifname: &str) -> String {
    format!("{OWNER_PREFIX}{container_id}/{ifname}")
}

/// What every owner string the CNI plugin writes starts with.
pub const OWNER_PREFIX: &str = "cni:";

/// Longest prefix of the container ID used as the endpoint name when the
/// runtime gives no pod name, or when another endpoint holds that name
/// (as `podman ps` shortens IDs).
const SHORT_ID_LEN: usize = 12;

/// The short form of `container_id`: an attachment's name when it has no
/// other, or when another endpoint holds the one it asks for.
pub fn short_id(container_id: &str) -> String {
    container_id.chars().take(SHORT_ID_LEN).collect()
}

/// The spec's rule: an alphanumeric, then alphanumerics, `_`, `.`, `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CniError::env(format!(
            "CNI_CONTAINERID {id:?} is invalid: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
        )))
    }
}

/// What the kernel accepts as an interface name.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CniError::env(format!(
            "CNI_IFNAME {name:?} is not a valid interface name: at most {MAX_IFNAME_LEN} bytes, no '/', ':' or whitespace"
        )))
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(raw: Option<&str>) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in raw.unwrap_or("").split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::env(format!(
                "CNI_ARGS entry {pair:?} is not KEY=VALUE"
            )));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::Code;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn each_command_requires_its_variables() {
        let all = [
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ];
        let inv = Invocation::read(Command::Add, env(&all)).unwrap();
        assert_eq!(inv.owner(), "cni:abc/eth0");
        assert_eq!(inv.args["K8S_POD_NAME"], "web");

        let no_netns = [("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")];
        assert!(Invocation::read(Command::Del, env(&no_netns)).is_ok());
        let e = Invocation::read(Command::Add, env(&no_netns)).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        assert!(e.details.contains("CNI_NETNS"), "{}", e.details);

        let e = Invocation::read(Command::Check, env(&[("CNI_NETNS", "")])).unwrap_err();
        assert!(
            e.details.contains("[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME]"),
            "{}",
            e.details
        );
        assert!(Invocation::read(Command::Gc, env(&[])).is_ok());
    }

    #[test]
    fn bad_ids_names_and_args_are_refused_naming_the_variable() {
        for (k, v) in [
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "a-very-long-ifname"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_ARGS", "novalue"),
        ] {
            let mut vars = vec![
                ("CNI_CONTAINERID", "abc"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
            ];
            vars.retain(|(n, _)| *n != k);
            vars.push((k, v));
            let e = Invocation::read(Command::Add, env(&vars)).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnvironment);
            assert!(e.details.contains(k), "{k}: {}", e.details);
        }
    }
}
