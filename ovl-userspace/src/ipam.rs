//! IPv4 subnets and address allocation inside them. Like Docker, the first
//! host address is kept for a gateway and never handed to a container.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Why an address could not be allocated or a subnet parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error(
        "invalid subnet {0:?}: expected an IPv4 CIDR such as 198.18.0.0/24 with a prefix of /8 to /29"
    )]
    BadSubnet(String),
    #[error("subnet {subnet} has host bits set; did you mean {network}/{prefix}?")]
    HostBitsSet {
        subnet: String,
        network: Ipv4Addr,
        prefix: u8,
    },
    #[error(
        "{ip} is not a usable address of {subnet} (outside it, or its network, gateway or broadcast address)"
    )]
    OutsideSubnet { ip: Ipv4Addr, subnet: Subnet },
    #[error("{0} is already in use on this network")]
    InUse(Ipv4Addr),
    #[error("no free address left in {0}")]
    Exhausted(Subnet),
}

/// An IPv4 subnet in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// Prefix length.
    pub const fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    fn base(&self) -> u32 {
        u32::from(self.network)
    }

    fn broadcast(&self) -> u32 {
        self.base() | !self.mask()
    }

    /// The range containers may get: after network and gateway, before
    /// broadcast.
    fn assignable(&self) -> std::ops::RangeInclusive<u32> {
        self.base() + 2..=self.broadcast() - 1
    }

    /// The subnet's first address (its network address).
    pub fn first(&self) -> Ipv4Addr {
        self.network
    }

    /// The subnet's last address (its broadcast address).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.broadcast())
    }

    /// True when `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.base()..=self.broadcast()).contains(&u32::from(ip))
    }

    /// True when `ip` may be given to an endpoint.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        self.assignable().contains(&u32::from(ip))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadSubnet(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=29).contains(&prefix) {
            return Err(bad());
        }
        let subnet = Subnet {
            network: addr,
            prefix,
        };
        let network = Ipv4Addr::from(u32::from(addr) & subnet.mask());
        if network != addr {
            return Err(IpamError::HostBitsSet {
                subnet: s.to_owned(),
                network,
                prefix,
            });
        }
        Ok(subnet)
    }
}

impl TryFrom<String> for Subnet {
    type Error = IpamError;
    fn try_from(s: String) -> Result<Self, IpamError> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// Picks an address of `subnet` not in `used`: `requested` if it is free
/// and assignable, else the lowest free one.
pub fn allocate(
    subnet: &Subnet,
    used: &BTreeSet<Ipv4Addr>,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    if let Some(ip) = requested {
        if !subnet.is_assignable(ip) {
            return Err(IpamError::OutsideSubnet {
                ip,
                subnet: *subnet,
            });
        }
        if used.contains(&ip) {
            return Err(IpamError::InUse(ip));
        }
        return Ok(ip);
    }
    subnet
        .assignable()
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
        .ok_or(IpamError::Exhausted(*subnet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_cidr_and_rejects_host_bits_and_odd_prefixes() {
        assert_eq!(net("198.18.0.0/24").to_string(), "198.18.0.0/24");
        assert!(matches!(
            "198.18.0.1/24".parse::<Subnet>(),
            Err(IpamError::HostBitsSet { .. })
        ));
        for bad in [
            "198.18.0.0",
            "198.18.0.0/33",
            "198.18.0.0/30",
            "x/24",
            "198.18.0.0/-1",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allocates_lowest_free_skipping_network_gateway_broadcast() {
        let s = net("198.18.0.0/29");
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Ok(ip) = allocate(&s, &used, None) {
            used.insert(ip);
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        assert_eq!(allocate(&s, &used, None), Err(IpamError::Exhausted(s)));
    }

    #[test]
    fn requested_address_must_be_free_and_inside() {
        let s = net("198.18.0.0/24");
        let used: BTreeSet<_> = [Ipv4Addr::new(198, 18, 0, 7)].into();
        assert_eq!(
            allocate(&s, &used, Some(Ipv4Addr::new(198, 18, 0, 8))),
            Ok(Ipv4Addr::new(198, 18, 0, 8))
        );
        assert_eq!(
            allocate(&s, &used, Some(Ipv4Addr::new(198, 18, 0, 7))),
            Err(IpamError::InUse(Ipv4Addr::new(198, 18, 0, 7)))
        );
        for bad in [
            [198, 18, 0, 0],
            [198, 18, 0, 1],
            [198, 18, 0, 255],
            [198, 19, 0, 5],
        ] {
            assert!(allocate(&s, &used, Some(Ipv4Addr::from(bad))).is_err());
        }
    }
}
