//! IPv4 subnets, the address pools a network is made of (a subnet, its
//! gateway and the range addresses are given from), and address allocation
//! across them. Like Docker, a subnet's gateway is its first host address
//! unless given, and never handed to a container; with an IP range
//! (`--ip-range`) only addresses inside it are given unless one is asked
//! for.

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
        "{ip} is not a usable address of {subnets} (outside them, or a network, gateway or broadcast address)"
    )]
    NotAssignable { ip: Ipv4Addr, subnets: String },
    #[error(
        "{0} is already in use on this network; pick another address or let ovl choose one (`ovl endpoint ls` lists who holds which)"
    )]
    InUse(Ipv4Addr),
    #[error(
        "no free address left in {0}; free some (`ovl disconnect`, `ovl endpoint rm`) or use a network with a larger subnet"
    )]
    Exhausted(String),
    #[error("{subnet} is not a subnet of this network (it has {subnets}); give one of those")]
    NoSuchSubnet { subnet: Subnet, subnets: String },
    #[error(
        "invalid IP range {0:?}: expected an IPv4 CIDR such as 198.18.0.128/25 with a prefix of /8 to /32"
    )]
    BadRange(String),
}

/// An IPv4 subnet in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

    /// The network address.
    pub const fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// True when `ip` is inside the subnet (any of its addresses).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.base()
    }

    /// True when the two subnets share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// True when `ip` is a host address of the subnet: inside it, neither
    /// its network nor its broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip > self.base() && ip < self.broadcast() && ip & self.mask() == self.base()
    }

    /// The subnet's first address (its network address).
    pub fn first(&self) -> Ipv4Addr {
        self.network
    }

    /// The subnet's last address (its broadcast address).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.broadcast())
    }

    /// The first host address: the default gateway.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
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

    fn hosts(&self) -> std::ops::RangeInclusive<u32> {
        self.base() + 1..=self.broadcast() - 1
    }
}

/// One subnet of a network and its gateway: the addresses its endpoints
/// get and the router they use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    /// Where in the subnet addresses are given from unless one is asked
    /// for; the whole subnet when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<IpRange>,
}

impl Pool {
    /// The pool of `subnet` with its first host address as gateway and no
    /// range.
    pub fn of(subnet: Subnet) -> Pool {
        Pool {
            subnet,
            gateway: subnet.first_host(),
            range: None,
        }
    }

    /// True when `ip` may be given to an endpoint that asks for it: a host
    /// address of the subnet that is not its gateway (inside the range or
    /// not, as with Docker).
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        self.subnet.is_host(ip) && ip != self.gateway
    }

    /// True when `ip` may be given to an endpoint that asks for no
    /// address: assignable and inside the range, if there is one.
    pub fn gives_unasked(&self, ip: Ipv4Addr) -> bool {
        self.is_assignable(ip) && self.range.is_none_or(|r| r.contains(ip))
    }

    /// The addresses given to endpoints that ask for none, lowest first.
    fn assignable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.subnet
            .hosts()
            .map(Ipv4Addr::from)
            .filter(|ip| self.gives_unasked(*ip))
    }

    /// Whether the range leaves an endpoint an address that is none of
    /// `kept` (auxiliary addresses); always without a range and without
    /// them, as subnets are /29 or larger.
    pub fn range_has_room<'a>(&self, kept: impl IntoIterator<Item = &'a Ipv4Addr>) -> bool {
        let kept: BTreeSet<&Ipv4Addr> = kept.into_iter().collect();
        self.assignable().any(|ip| !kept.contains(&ip))
    }
}

/// The subnets of `pools`, for messages: "198.18.0.0/24, 198.18.1.0/24".
pub fn describe(pools: &[Pool]) -> String {
    pools
        .iter()
        .map(|p| p.subnet.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where addresses of `pools` are given from, for "none left" messages:
/// "198.18.0.0/24 (range 198.18.0.128/25), 198.18.1.0/24".
fn describe_ranges(pools: &[Pool]) -> String {
    pools
        .iter()
        .map(|p| match p.range {
            Some(r) => format!("{} (range {r})", p.subnet),
            None => p.subnet.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, IpamError> {
        parse_cidr(s, 8..=29, IpamError::BadSubnet)
    }
}

/// `s` as a CIDR block whose prefix is one of `prefixes` and whose address
/// has no host bits; `bad` says what is wrong with its form.
fn parse_cidr(
    s: &str,
    prefixes: std::ops::RangeInclusive<u8>,
    bad: fn(String) -> IpamError,
) -> Result<Subnet, IpamError> {
    let bad = || bad(s.to_owned());
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !prefixes.contains(&prefix) {
        return Err(bad());
    }
    let block = Subnet {
        network: addr,
        prefix,
    };
    let network = Ipv4Addr::from(u32::from(addr) & block.mask());
    if network != addr {
        return Err(IpamError::HostBitsSet {
            subnet: s.to_owned(),
            network,
            prefix,
        });
    }
    Ok(block)
}

/// The part of a subnet its endpoints are given addresses from unless
/// they ask for one (Docker's `--ip-range`): a CIDR block inside the
/// subnet, as small as one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpRange(Subnet);

impl IpRange {
    /// True when `ip` is inside the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.contains(ip)
    }

    /// True when the whole range lies inside `subnet`.
    pub fn is_within(&self, subnet: &Subnet) -> bool {
        self.0.prefix >= subnet.prefix && subnet.contains(self.0.network)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for IpRange {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, IpamError> {
        parse_cidr(s, 8..=32, IpamError::BadRange).map(IpRange)
    }
}

impl TryFrom<String> for IpRange {
    type Error = IpamError;
    fn try_from(s: String) -> Result<Self, IpamError> {
        s.parse()
    }
}

impl From<IpRange> for String {
    fn from(r: IpRange) -> String {
        r.to_string()
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

/// Picks an address of a network made of `pools` that is not in `used`:
/// `requested` if it is free and assignable in one of them; else the
/// lowest free one in the range of subnet `within`, if given, or of the
/// first pool with room.
pub fn allocate(
    pools: &[Pool],
    used: &BTreeSet<Ipv4Addr>,
    requested: Option<Ipv4Addr>,
    within: Option<Subnet>,
) -> Result<Ipv4Addr, IpamError> {
    let candidates: Vec<&Pool> = match within {
        Some(subnet) => {
            let pool = pools.iter().find(|p| p.subnet == subnet).ok_or_else(|| {
                IpamError::NoSuchSubnet {
                    subnet,
                    subnets: describe(pools),
                }
            })?;
            vec![pool]
        }
        None => pools.iter().collect(),
    };
    if let Some(ip) = requested {
        if !candidates.iter().any(|p| p.is_assignable(ip)) {
            let pools: Vec<Pool> = candidates.iter().map(|p| **p).collect();
            return Err(IpamError::NotAssignable {
                ip,
                subnets: describe(&pools),
            });
        }
        if used.contains(&ip) {
            return Err(IpamError::InUse(ip));
        }
        return Ok(ip);
    }
    candidates
        .iter()
        .find_map(|p| p.assignable().find(|ip| !used.contains(ip)))
        .ok_or_else(|| {
            let pools: Vec<Pool> = candidates.iter().map(|p| **p).collect();
            IpamError::Exhausted(describe_ranges(&pools))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    fn pool(s: &str) -> Pool {
        Pool::of(net(s))
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
    fn ip_ranges_are_cidr_blocks_down_to_one_address() {
        let r: IpRange = "198.18.0.128/25".parse().unwrap();
        assert!(r.contains(Ipv4Addr::new(198, 18, 0, 200)));
        assert!(!r.contains(Ipv4Addr::new(198, 18, 0, 100)));
        assert!(r.is_within(&net("198.18.0.0/24")));
        assert!(!r.is_within(&net("198.18.0.0/25")));
        assert!(
            !"198.18.0.0/16"
                .parse::<IpRange>()
                .unwrap()
                .is_within(&net("198.18.0.0/24"))
        );
        let one: IpRange = "198.18.0.9/32".parse().unwrap();
        assert_eq!(one.to_string(), "198.18.0.9/32");
        assert!(matches!(
            "198.18.0.9/24".parse::<IpRange>(),
            Err(IpamError::HostBitsSet { .. })
        ));
        for bad in ["198.18.0.0", "198.18.0.0/33", "198.18.0.0/7", "x/25"] {
            let err = bad.parse::<IpRange>().unwrap_err();
            assert!(err.to_string().contains("invalid IP range"), "{bad}: {err}");
        }
    }

    #[test]
    fn allocates_lowest_free_skipping_network_gateway_broadcast() {
        let p = [pool("198.18.0.0/29")];
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Ok(ip) = allocate(&p, &used, None, None) {
            used.insert(ip);
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        assert_eq!(
            allocate(&p, &used, None, None),
            Err(IpamError::Exhausted("198.18.0.0/29".into()))
        );
    }

    #[test]
    fn a_gateway_elsewhere_frees_the_first_address() {
        let p = [Pool {
            gateway: Ipv4Addr::new(198, 18, 0, 6),
            ..pool("198.18.0.0/29")
        }];
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Ok(ip) = allocate(&p, &used, None, None) {
            used.insert(ip);
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn fills_the_first_subnet_with_room_unless_one_is_named() {
        let p = [pool("198.18.0.0/29"), pool("198.18.1.0/29")];
        let mut used: BTreeSet<_> = (2..=6).map(|d| Ipv4Addr::new(198, 18, 0, d)).collect();
        assert_eq!(
            allocate(&p, &used, None, None),
            Ok(Ipv4Addr::new(198, 18, 1, 2))
        );
        used.remove(&Ipv4Addr::new(198, 18, 0, 4));
        assert_eq!(
            allocate(&p, &used, None, None),
            Ok(Ipv4Addr::new(198, 18, 0, 4))
        );
        assert_eq!(
            allocate(&p, &used, None, Some(net("198.18.1.0/29"))),
            Ok(Ipv4Addr::new(198, 18, 1, 2))
        );
        assert!(matches!(
            allocate(&p, &used, None, Some(net("198.18.2.0/29"))),
            Err(IpamError::NoSuchSubnet { .. })
        ));
        // An address of the second subnet, asked for within the first.
        assert!(matches!(
            allocate(
                &p,
                &used,
                Some(Ipv4Addr::new(198, 18, 1, 3)),
                Some(net("198.18.0.0/29"))
            ),
            Err(IpamError::NotAssignable { .. })
        ));
    }

    #[test]
    fn gateway_containment_and_overlap() {
        let s = net("198.18.0.0/24");
        assert_eq!(s.first_host(), Ipv4Addr::new(198, 18, 0, 1));
        assert!(s.contains(Ipv4Addr::new(198, 18, 0, 255)));
        assert!(!s.contains(Ipv4Addr::new(198, 18, 1, 0)));
        assert!(s.overlaps(&net("198.18.0.0/16")));
        assert!(net("198.18.0.0/16").overlaps(&s));
        assert!(s.overlaps(&net("198.18.0.128/25")));
        assert!(!s.overlaps(&net("198.18.1.0/24")));
    }

    #[test]
    fn requested_address_must_be_free_and_inside() {
        let p = [pool("198.18.0.0/24"), pool("198.18.4.0/24")];
        let used: BTreeSet<_> = [Ipv4Addr::new(198, 18, 0, 7)].into();
        assert_eq!(
            allocate(&p, &used, Some(Ipv4Addr::new(198, 18, 0, 8)), None),
            Ok(Ipv4Addr::new(198, 18, 0, 8))
        );
        assert_eq!(
            allocate(&p, &used, Some(Ipv4Addr::new(198, 18, 4, 9)), None),
            Ok(Ipv4Addr::new(198, 18, 4, 9))
        );
        assert_eq!(
            allocate(&p, &used, Some(Ipv4Addr::new(198, 18, 0, 7)), None),
            Err(IpamError::InUse(Ipv4Addr::new(198, 18, 0, 7)))
        );
        for bad in [
            [198, 18, 0, 0],
            [198, 18, 0, 1],
            [198, 18, 0, 255],
            [198, 18, 4, 1],
            [198, 19, 0, 5],
        ] {
            let err = allocate(&p, &used, Some(Ipv4Addr::from(bad)), None).unwrap_err();
            assert!(
                err.to_string().contains("198.18.0.0/24, 198.18.4.0/24"),
                "{err}"
            );
        }
    }

    #[test]
    fn overlap_and_membership() {
        let a = net("198.18.0.0/16");
        assert!(a.overlaps(&net("198.18.4.0/24")));
        assert!(net("198.18.4.0/24").overlaps(&a));
        assert!(!net("198.18.0.0/24").overlaps(&net("198.18.1.0/24")));
        assert!(a.contains(Ipv4Addr::new(198, 18, 255, 255)));
        assert!(!a.is_host(Ipv4Addr::new(198, 18, 255, 255)));
        assert!(!a.is_host(Ipv4Addr::new(198, 18, 0, 0)));
        assert!(a.is_host(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(!a.is_host(Ipv4Addr::new(198, 19, 0, 1)));
    }
}
