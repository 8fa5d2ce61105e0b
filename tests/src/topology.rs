// Underlay topologies built from lab namespaces: hosts behind a router, hosts
// on one switched segment, and empty container namespaces.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};

use crate::lab::Lab;
use crate::netns::Netns;

/// The underlay interface name inside every host namespace.
pub const HOST_IFACE: &str = "eth0";

/// Underlay MTU: a plain Ethernet underlay.
pub const UNDERLAY_MTU: u32 = 1500;

/// Every underlay subnet is a /24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;

/// Routed hosts, one documentation subnet each (RFC 5737 TEST-NET-1..3):
/// (host address, router address on that subnet).
const ROUTED_SUBNETS: [(Ipv4Addr, Ipv4Addr); 3] = [
    (Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 1)),
    (
        Ipv4Addr::new(198, 51, 100, 10),
        Ipv4Addr::new(198, 51, 100, 1),
    ),
    (
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(203, 0, 113, 1),
    ),
];

/// The first host address on the switched segment; host i gets `.10 + i`.
const L2_FIRST_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// Most hosts on the switched segment: .10 to .254 of 192.0.2.0/24
/// (.1 to .9 stay free for servers the lab adds, such as an etcd).
pub const L2_MAX_HOSTS: usize = 245;

/// Bridge joining the hosts inside the switch namespace.
pub const SWITCH_BRIDGE: &str = "br0";

/// One underlay host: a namespace whose [`HOST_IFACE`] link carries the
/// host's underlay address (the VTEP address in overlay tests).
#[derive(Clone, Debug)]
pub struct Host {
    /// The host's network namespace.
    pub netns: Netns,
    /// The underlay interface, always [`HOST_IFACE`].
    pub iface: String,
    /// The host's underlay address.
    pub addr: Ipv4Addr,
    /// Prefix length of the underlay subnet.
    pub prefix_len: u8,
    /// The default gateway; `None` on a single switched segment.
    pub gateway: Option<Ipv4Addr>,
}

impl Host {
    /// Moves the host's underlay address to `new` in its subnet (DHCP,
    /// say): the new one first, then the old one goes, the default route
    /// kept. Returns a host whose `addr` is the new one.
    pub fn move_address(&self, new: Ipv4Addr) -> Result<Host> {
        ensure!(new != self.addr, "{} has {new} already", self.netns);
        let ns = &self.netns;
        let iface = format!("net.ipv4.conf.{}.promote_secondaries", self.iface);
        ns.sysctl(&iface, "1")?;
        ns.ip(&[
            "addr",
            "add",
            &cidr(new, self.prefix_len),
            "dev",
            &self.iface,
        ])?;
        ns.ip(&[
            "addr",
            "del",
            &cidr(self.addr, self.prefix_len),
            "dev",
            &self.iface,
        ])?;
        if let Some(gateway) = self.gateway {
            ns.ip(&["route", "replace", "default", "via", &gateway.to_string()])?;
        }
        Ok(Host {
            addr: new,
            ..self.clone()
        })
    }
}

impl Lab {
    /// Builds `n` (1..=3) hosts, each on its own /24 behind one forwarding
    /// router namespace: host 0 is 192.0.2.10 (router .1), host 1
    /// 198.51.100.10, host 2 203.0.113.10. Every host has `eth0` with MTU
    /// 1500 and a default route via the router, so VTEP-to-VTEP traffic is
    /// routed, not bridged — as between real hosts in different racks.
    pub fn routed_hosts(&self, n: usize) -> Result<(Netns, Vec<Host>)> {
        ensure!(
            (1..=ROUTED_SUBNETS.len()).contains(&n),
            "routed_hosts supports 1..={} hosts, asked for {n}",
            ROUTED_SUBNETS.len()
        );
        let router = self.netns("router")?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        let mut hosts = Vec::with_capacity(n);
        for (index, &(addr, gateway)) in ROUTED_SUBNETS.iter().take(n).enumerate() {
            let netns = self.netns(&format!("host{index}"))?;
            let router_port = format!("h{index}");
            create_veth(&netns, HOST_IFACE, &router, &router_port)?;
            router.ip(&[
                "addr",
                "add",
                &cidr(gateway, UNDERLAY_PREFIX_LEN),
                "dev",
                &router_port,
            ])?;
            router.ip(&["link", "set", &router_port, "up"])?;
            let host = configure_host(netns, addr, Some(gateway))?;
            hosts.push(host);
        }
        Ok((router, hosts))
    }

    /// Builds `n` (1..=[`L2_MAX_HOSTS`]) hosts on one 192.0.2.0/24 segment
    /// (.10, .11, .12, ...), joined by a bridge ([`SWITCH_BRIDGE`]) in a
    /// "switch" namespace; no router, no gateway.
    pub fn l2_hosts(&self, n: usize) -> Result<(Netns, Vec<Host>)> {
        ensure!(
            (1..=L2_MAX_HOSTS).contains(&n),
            "l2_hosts supports 1..={L2_MAX_HOSTS} hosts, asked for {n}"
        );
        let switch = self.netns("switch")?;
        switch.ip(&["link", "add", SWITCH_BRIDGE, "type", "bridge"])?;
        switch.ip(&["link", "set", SWITCH_BRIDGE, "up"])?;
        let mut hosts = Vec::with_capacity(n);
        for index in 0..n {
            let netns = self.netns(&format!("host{index}"))?;
            let switch_port = format!("p{index}");
            create_veth(&netns, HOST_IFACE, &switch, &switch_port)?;
            switch.ip(&["link", "set", &switch_port, "master", SWITCH_BRIDGE, "up"])?;
            let [a, b, c, d] = L2_FIRST_HOST.octets();
            let addr = Ipv4Addr::new(a, b, c, d + index as u8);
            hosts.push(configure_host(netns, addr, None)?);
        }
        Ok((switch, hosts))
    }

    /// An empty namespace standing for a container (`lo` up, IPv6 off),
    /// named after `name_hint`.
    pub fn container(&self, name_hint: &str) -> Result<Netns> {
        self.netns(&format!("c-{name_hint}"))
    }
}

/// Creates a veth pair with each end born in its target namespace, so no
/// interface ever appears in the root namespace (where names could clash
/// between parallel tests).
pub fn create_veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    crate::cmd::run(&[
        "ip",
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])?;
    Ok(())
}

/// `ADDR/LEN` as `ip` expects it.
pub fn cidr(addr: Ipv4Addr, prefix_len: u8) -> String {
    format!("{addr}/{prefix_len}")
}

fn configure_host(netns: Netns, addr: Ipv4Addr, gateway: Option<Ipv4Addr>) -> Result<Host> {
    let mtu = UNDERLAY_MTU.to_string();
    netns.ip(&["link", "set", HOST_IFACE, "mtu", &mtu, "up"])?;
    netns.ip(&[
        "addr",
        "add",
        &cidr(addr, UNDERLAY_PREFIX_LEN),
        "dev",
        HOST_IFACE,
    ])?;
    if let Some(gateway) = gateway {
        netns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    }
    Ok(Host {
        netns,
        iface: HOST_IFACE.to_string(),
        addr,
        prefix_len: UNDERLAY_PREFIX_LEN,
        gateway,
    })
}
