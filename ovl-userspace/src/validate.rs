//! Rules for identifiers and addresses that come from the command line or
//! an API and end up in paths, maps or the store: node names, VTEPs, MACs
//! and overlay subnets. Each check names what is wrong and what to do.

use std::net::Ipv4Addr;

use crate::{ipam::Subnet, model::MacAddr};

/// Longest node name: a DNS label's limit.
pub const NODE_NAME_MAX: usize = 63;

/// Why an identifier or address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidInput {
    #[error(
        "invalid node name {0:?}: use 1-{NODE_NAME_MAX} characters from [A-Za-z0-9._-], starting and ending with a letter or digit (a host name); pass --node NAME"
    )]
    NodeName(String),
    #[error("{ip} cannot be a VTEP: it is {why}; give the underlay address of the remote host")]
    Vtep { ip: Ipv4Addr, why: &'static str },
    #[error(
        "{mac} cannot be an endpoint's MAC: it is {why}; give a unicast address such as 02:42:c6:12:00:09"
    )]
    Mac { mac: MacAddr, why: &'static str },
    #[error(
        "subnet {subnet} overlaps {range} ({why}); pick a private or benchmarking range such as 198.18.0.0/24"
    )]
    Subnet {
        subnet: Subnet,
        range: &'static str,
        why: &'static str,
    },
}

/// A node name: it names a directory under the pin root, a socket and a
/// store key, so it must be one path component and a plausible host name.
pub fn node_name(name: &str) -> Result<(), InvalidInput> {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    let ok = !name.is_empty()
        && name.len() <= NODE_NAME_MAX
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::NodeName(name.to_owned()))
    }
}

/// An address a VXLAN frame can be sent to: a unicast host address.
pub fn vtep(ip: Ipv4Addr) -> Result<(), InvalidInput> {
    let why = if ip.is_unspecified() {
        "the unspecified address"
    } else if ip.is_broadcast() {
        "the broadcast address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.octets()[0] == 0 {
        "in 0.0.0.0/8 (this network)"
    } else {
        return Ok(());
    };
    Err(InvalidInput::Vtep { ip, why })
}

/// A MAC an endpoint can own: unicast and not all zeros.
pub fn mac(mac: MacAddr) -> Result<(), InvalidInput> {
    let why = if mac.0 == [0; 6] {
        "all zeros"
    } else if mac.0[0] & 1 == 1 {
        "a multicast (or broadcast) address: the first octet is odd"
    } else {
        return Ok(());
    };
    Err(InvalidInput::Mac { mac, why })
}

/// Ranges an overlay subnet must stay out of: containers could not use
/// them, or routing them into the overlay would break the host.
/// (range, first address, last address, why).
const RESERVED: [(&str, [u8; 4], [u8; 4], &str); 4] = [
    (
        "0.0.0.0/8",
        [0, 0, 0, 0],
        [0, 255, 255, 255],
        "this network",
    ),
    (
        "127.0.0.0/8",
        [127, 0, 0, 0],
        [127, 255, 255, 255],
        "loopback",
    ),
    (
        "224.0.0.0/4",
        [224, 0, 0, 0],
        [239, 255, 255, 255],
        "multicast",
    ),
    (
        "240.0.0.0/4",
        [240, 0, 0, 0],
        [255, 255, 255, 255],
        "reserved, holds the broadcast address",
    ),
];

/// An overlay subnet: none of the reserved ranges above.
pub fn subnet(subnet: &Subnet) -> Result<(), InvalidInput> {
    let (first, last) = (u32::from(subnet.first()), u32::from(subnet.last()));
    for (range, lo, hi, why) in RESERVED {
        if first <= u32::from_be_bytes(hi) && u32::from_be_bytes(lo) <= last {
            return Err(InvalidInput::Subnet {
                subnet: *subnet,
                range,
                why,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_one_safe_path_component() {
        for good in ["host-a", "a", "node_1", "h.example.com", &"x".repeat(63)] {
            assert_eq!(node_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/",
            "../etc",
            "-a",
            "a-",
            ".a",
            "a..b",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(node_name(bad).is_err(), "{bad:?} accepted");
        }
        let msg = node_name("..").unwrap_err().to_string();
        assert!(msg.contains("--node"), "{msg}");
    }

    #[test]
    fn vteps_must_be_unicast_host_addresses() {
        assert_eq!(vtep(Ipv4Addr::new(192, 0, 2, 5)), Ok(()));
        for bad in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [224, 0, 0, 1],
            [239, 1, 2, 3],
            [127, 0, 0, 1],
            [0, 1, 2, 3],
        ] {
            assert!(vtep(Ipv4Addr::from(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn macs_must_be_unicast_and_not_zero() {
        assert_eq!(mac("02:42:c6:12:00:09".parse().unwrap()), Ok(()));
        for bad in [
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
        ] {
            assert!(mac(bad.parse().unwrap()).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn subnets_stay_out_of_reserved_ranges() {
        for good in ["198.18.0.0/24", "10.0.0.0/8", "192.168.1.0/24"] {
            assert_eq!(subnet(&good.parse().unwrap()), Ok(()), "{good}");
        }
        for bad in [
            "224.0.0.0/24",
            "239.255.0.0/16",
            "127.0.0.0/8",
            "127.1.0.0/16",
            "0.0.0.0/8",
            "255.255.255.0/24",
            "240.0.0.0/8",
        ] {
            assert!(subnet(&bad.parse().unwrap()).is_err(), "{bad} accepted");
        }
    }
}
