//! CNI error results: the spec's well-known codes, ovl's own (100 and up),
//! and how a failure of the store, the model or netlink maps onto them.

use crate::{ipam::IpamError, model::ModelError, store::StoreError};

/// An error code of the CNI error result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: the configuration's cniVersion is not one ovl speaks, or too old
    /// for the command.
    IncompatibleVersion,
    /// 2: a configuration key ovl does not support.
    UnsupportedField,
    /// 3: the container (its network namespace) does not exist.
    UnknownContainer,
    /// 4: a CNI_* variable is missing or invalid.
    InvalidEnvironment,
    /// 5: reading stdin or the store's files failed.
    Io,
    /// 6: stdin is not the JSON the spec describes.
    Decode,
    /// 7: the configuration is invalid (bad store URL or store option, no
    /// such network).
    InvalidConfig,
    /// 11: a transient condition (store unreachable or contended, its lock
    /// held too long).
    TryAgainLater,
    /// 50 (STATUS): ovl cannot serve ADD now.
    NotAvailable,
    /// 51 (STATUS): as 50, and existing containers have no data path.
    NotAvailableLimitedConnectivity,
    /// 100: the network's subnet has no free address.
    AddressesExhausted,
    /// 101: the container already has an interface by that name, or this
    /// attachment already exists.
    InterfaceExists,
    /// 102: the address asked for is taken.
    AddressInUse,
    /// 103: the container is attached to the network under another
    /// interface name (ovl gives a container one address per network).
    AlreadyOnNetwork,
    /// 110 (CHECK): the attachment is not as ADD made it.
    CheckFailed,
    /// 999: anything else (a kernel or netlink failure), as the reference
    /// library reports internal errors.
    Internal,
}

impl Code {
    /// The number on the wire.
    pub const fn number(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnsupportedField => 2,
            Code::UnknownContainer => 3,
            Code::InvalidEnvironment => 4,
            Code::Io => 5,
            Code::Decode => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::NotAvailable => 50,
            Code::NotAvailableLimitedConnectivity => 51,
            Code::AddressesExhausted => 100,
            Code::InterfaceExists => 101,
            Code::AddressInUse => 102,
            Code::AlreadyOnNetwork => 103,
            Code::CheckFailed => 110,
            Code::Internal => 999,
        }
    }

    /// The short message (`msg`) for the code.
    pub const fn message(self) -> &'static str {
        match self {
            Code::IncompatibleVersion => "Incompatible CNI version",
            Code::UnsupportedField => "Unsupported field in network configuration",
            Code::UnknownContainer => "Container unknown or does not exist",
            Code::InvalidEnvironment => "Invalid necessary environment variables",
            Code::Io => "I/O failure",
            Code::Decode => "Failed to decode content",
            Code::InvalidConfig => "Invalid network config",
            Code::TryAgainLater => "Try again later",
            Code::NotAvailable => "ovl cannot serve ADD requests on this node",
            Code::NotAvailableLimitedConnectivity => {
                "ovl cannot serve ADD requests and containers on this node have no data path"
            }
            Code::AddressesExhausted => "No free address left on the network",
            Code::InterfaceExists => "Interface already exists",
            Code::AddressInUse => "Address already in use",
            Code::AlreadyOnNetwork => "Container already attached to this network",
            Code::CheckFailed => "Attachment is not as expected",
            Code::Internal => "ovl failed",
        }
    }
}

/// A failure as the error result reports it.
#[derive(Debug, thiserror::Error)]
#[error("{} ({}): {details}", .code.message(), .code.number())]
pub struct CniError {
    pub code: Code,
    /// What went wrong and what to do, for the `details` field.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `details`.
    pub fn new(code: Code, details: impl Into<String>) -> CniError {
        CniError {
            code,
            details: details.into(),
        }
    }

    /// Code 1.
    pub fn incompatible(details: impl Into<String>) -> CniError {
        Self::new(Code::IncompatibleVersion, details)
    }

    /// Code 6.
    pub fn decode(details: impl Into<String>) -> CniError {
        Self::new(Code::Decode, details)
    }

    /// Code 4.
    pub fn env(details: impl Into<String>) -> CniError {
        Self::new(Code::InvalidEnvironment, details)
    }

    /// Code 7.
    pub fn config(details: impl Into<String>) -> CniError {
        Self::new(Code::InvalidConfig, details)
    }

    /// Classifies a failure of the store, the model or the plumbing by the
    /// first typed cause in its chain; the details keep the whole chain.
    pub fn from_failure(e: &anyhow::Error) -> CniError {
        let details = format!("{e:#}");
        let code = e
            .chain()
            .find_map(|cause| {
                if let Some(s) = cause.downcast_ref::<StoreError>() {
                    Some(store_code(s))
                } else if let Some(m) = cause.downcast_ref::<ModelError>() {
                    Some(model_code(m))
                } else {
                    cause.downcast_ref::<IpamError>().map(ipam_code)
                }
            })
            .unwrap_or(Code::Internal);
        CniError::new(code, details)
    }
}

impl From<StoreError> for CniError {
    fn from(e: StoreError) -> CniError {
        CniError::new(store_code(&e), e.to_string())
    }
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::UnsupportedUrl(_) | StoreError::BadOption(_) => Code::InvalidConfig,
        // Another process holds the file store's lock: contention, as
        // etcd's conflicting changes are.
        StoreError::Etcd { .. }
        | StoreError::EtcdOutcomeUnknown { .. }
        | StoreError::Contended(_)
        | StoreError::LockTimeout { .. } => Code::TryAgainLater,
        StoreError::Io { .. } => Code::Io,
        StoreError::Rejected(m) => model_code(m),
        StoreError::TooManyPorts { .. } => Code::InvalidConfig,
        _ => Code::Internal,
    }
}

fn model_code(e: &ModelError) -> Code {
    match e {
        ModelError::NoSuchNetwork(_) => Code::InvalidConfig,
        ModelError::AlreadyConnected { .. } => Code::AlreadyOnNetwork,
        ModelError::Ipam(i) => ipam_code(i),
        ModelError::PortTaken { .. }
        | ModelError::HostPortInUse(_)
        | ModelError::PortOfOverlay { .. }
        | ModelError::MacTaken { .. }
        | ModelError::AuxAddress { .. } => Code::AddressInUse,
        ModelError::Port(_)
        | ModelError::PublishOnInternal(_)
        | ModelError::MacOfOvl { .. }
        | ModelError::GatewayMac(_)
        | ModelError::Invalid(_) => Code::InvalidConfig,
        // Freed addresses held back for --address-grace: they clear up
        // by themselves, which is what 11 tells a runtime.
        ModelError::AddressHeld { .. } | ModelError::AllFreeAddressesHeld { .. } => {
            Code::TryAgainLater
        }
        _ => Code::Internal,
    }
}

fn ipam_code(e: &IpamError) -> Code {
    match e {
        IpamError::Exhausted(_) => Code::AddressesExhausted,
        IpamError::InUse(_) => Code::AddressInUse,
        IpamError::NotAssignable { .. } | IpamError::NoSuchSubnet { .. } => Code::InvalidConfig,
        _ => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn typed_causes_deep_in_a_chain_pick_the_code() {
        let exhausted: anyhow::Error = StoreError::Rejected(ModelError::Ipam(
            IpamError::Exhausted("198.18.0.0/29".parse().unwrap()),
        ))
        .into();
        let e = CniError::from_failure(&exhausted.context("connect x to y"));
        assert_eq!(e.code, Code::AddressesExhausted);
        assert!(e.details.contains("connect x to y") && e.details.contains("198.18.0.0/29"));

        let down: anyhow::Error = StoreError::Etcd {
            endpoints: "h:1".into(),
            detail: "refused".into(),
        }
        .into();
        assert_eq!(CniError::from_failure(&down).code, Code::TryAgainLater);

        let netlink = Err::<(), _>(std::io::Error::other("EPERM")).context("create veth");
        assert_eq!(
            CniError::from_failure(&netlink.unwrap_err()).code,
            Code::Internal
        );
    }

    #[test]
    fn a_host_port_a_server_of_the_host_serves_is_in_use() {
        let port = "8080:80".parse().unwrap();
        let taken = anyhow::Error::from(StoreError::Rejected(ModelError::HostPortInUse(
            crate::ports::HostPortInUse { port },
        )))
        .context("connect x to net1");
        let e = CniError::from_failure(&taken);
        assert_eq!(e.code, Code::AddressInUse);
        assert!(e.details.contains("ss -lntup"), "{}", e.details);
    }

    #[test]
    fn addresses_held_back_for_their_grace_are_try_again_later() {
        let held = StoreError::Rejected(ModelError::AddressHeld {
            network: "net1".into(),
            ip: std::net::Ipv4Addr::new(198, 18, 0, 9),
            ago_s: 3,
            left_s: 57,
        });
        assert_eq!(CniError::from(held).code, Code::TryAgainLater);
        let all = anyhow::Error::from(StoreError::Rejected(ModelError::AllFreeAddressesHeld {
            network: "net1".into(),
            subnets: "198.18.0.0/29".into(),
            held: 5,
        }))
        .context("connect x to net1");
        let e = CniError::from_failure(&all);
        assert_eq!(e.code, Code::TryAgainLater);
        assert!(e.details.contains("--address-grace"), "{}", e.details);
    }

    #[test]
    fn a_held_store_lock_is_try_again_and_a_bad_store_option_invalid_config() {
        let held = || StoreError::LockTimeout {
            path: "/var/lib/ovl/state.lock".into(),
            waited: std::time::Duration::from_secs(10),
            holder: "pid 7 (ovl)".into(),
        };
        assert_eq!(CniError::from(held()).code, Code::TryAgainLater);
        let deep = anyhow::Error::from(held()).context("connect x to y");
        assert_eq!(CniError::from_failure(&deep).code, Code::TryAgainLater);

        let bad = || StoreError::BadOption("lock-timeout \"soon\" is not a number".into());
        assert_eq!(CniError::from(bad()).code, Code::InvalidConfig);
        let deep = anyhow::Error::from(bad()).context("open the store");
        assert_eq!(CniError::from_failure(&deep).code, Code::InvalidConfig);
    }
}
