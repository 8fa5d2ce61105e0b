//! The container's isolation domain as CNI_NETNS names it: it must exist,
//! be a network namespace, and not be the one the plugin runs in.

use std::{fs::File, os::unix::fs::MetadataExt, path::Path};

use super::error::{CniError, Code};

/// Checks CNI_NETNS before anything is registered: missing is an unknown
/// container (3), anything else wrong an invalid variable (4).
pub fn check(netns: &str) -> Result<(), CniError> {
    let path = Path::new(netns);
    if !path.is_absolute() {
        return Err(CniError::env(format!(
            "CNI_NETNS {netns:?} must be an absolute path to a network namespace"
        )));
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CniError::new(
                Code::UnknownContainer,
                format!(
                    "CNI_NETNS {netns} does not exist: the container's network namespace is gone"
                ),
            ));
        }
        Err(e) => return Err(CniError::env(format!("cannot open CNI_NETNS {netns}: {e}"))),
    };
    if !crate::netns::is_network_namespace(&file) {
        return Err(CniError::env(format!(
            "CNI_NETNS {netns} is not a network namespace file"
        )));
    }
    let ours = std::fs::metadata("/proc/self/ns/net");
    let theirs = file.metadata();
    if let (Ok(a), Ok(b)) = (ours, theirs)
        && a.dev() == b.dev()
        && a.ino() == b.ino()
    {
        return Err(CniError::env(format!(
            "CNI_NETNS {netns} is the plugin's own network namespace, not a container's"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_relative_foreign_and_own_namespaces_are_told_apart() {
        assert_eq!(
            check("/nonexistent/ns").unwrap_err().code,
            Code::UnknownContainer
        );
        assert_eq!(check("ns").unwrap_err().code, Code::InvalidEnvironment);
        assert_eq!(
            check("/etc/hostname").unwrap_err().code,
            Code::InvalidEnvironment
        );
        let own = check("/proc/self/ns/net").unwrap_err();
        assert!(
            own.details.contains("own network namespace"),
            "{}",
            own.details
        );
    }
}
