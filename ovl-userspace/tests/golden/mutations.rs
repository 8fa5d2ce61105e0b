//! Mutated golden packets: each program's valid frames cut at every
//! length, flipped in every header bit, with header fields set to lies
//! (lengths, IHL, checksums, flags and fragments, VNI, EtherType), VLAN
//! tags and IPv4 options added, and scrambled at random, each run through
//! its program. Whatever a program does with one, the packet is accounted
//! for: a legitimate verdict; dropped means exactly one drop reason
//! counted once; passed or forwarded means no drop counted; what is
//! forwarded fits its frame and goes where the maps say.
//!
//! Deterministic: the random mutations come from a fixed-seed xorshift, so
//! a failure reproduces as it was reported.

use std::{collections::BTreeSet, fmt::Write as _};

use ovl_common::{
    UnderlayCounters,
    wire::{ETH_P_ARP, IPPROTO_TCP, VXLAN_PORT},
};

use super::*;

/// Marsaglia's xorshift64: small, fast, and the same numbers everywhere.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// The program a frame is run through, as BPF_PROG_TEST_RUN runs it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hook {
    XdpDecap,
    TcDecap,
    /// Container egress, from C1's veth.
    Egress,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::XdpDecap => programs::XDP_DECAP,
            Hook::TcDecap => programs::TC_DECAP,
            Hook::Egress => programs::TC_EGRESS,
        }
    }

    fn ctx(self) -> Option<Vec<u8>> {
        (self != Hook::XdpDecap).then(|| skb_ctx(TEST_RUN_IFINDEX))
    }

    /// Its verdicts: go on to the host stack, drop, redirect.
    fn verdicts(self) -> [u32; 3] {
        match self {
            Hook::XdpDecap => [XDP_PASS, XDP_DROP, XDP_REDIRECT],
            Hook::TcDecap | Hook::Egress => [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        }
    }
}

/// One counter of a network's `VniCounters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    TxPackets,
    TxBytes,
    RxPackets,
    RxBytes,
    Local,
    ArpReplies,
    Egress,
    Drop(DropReason),
}

fn fields(c: &VniCounters) -> Vec<(Counter, u64)> {
    let mut all = vec![
        (Counter::TxPackets, c.tx_packets),
        (Counter::TxBytes, c.tx_bytes),
        (Counter::RxPackets, c.rx_packets),
        (Counter::RxBytes, c.rx_bytes),
        (Counter::Local, c.local_packets),
        (Counter::ArpReplies, c.arp_replies),
        (Counter::Egress, c.egress_packets),
    ];
    all.extend(
        DropReason::ALL
            .iter()
            .map(|r| (Counter::Drop(*r), c.drops_for(*r))),
    );
    all
}

/// Every counter of the fixture's maps.
struct Counts {
    vnis: BTreeMap<u32, VniCounters>,
    global: UnderlayCounters,
}

fn counts(f: &Fixture) -> Result<Counts> {
    Ok(Counts {
        vnis: datapath::read_counters(f.pin_dir())?,
        global: datapath::read_global(f.pin_dir())?,
    })
}

/// The per-network counters that moved, by how much; an error names one
/// that went back.
fn moved(before: &Counts, after: &Counts) -> Result<Vec<(u32, Counter, u64)>, String> {
    let mut out = Vec::new();
    for (vni, a) in &after.vnis {
        let b = before.vnis.get(vni).copied().unwrap_or_default();
        for ((counter, was), (_, is)) in fields(&b).into_iter().zip(fields(a)) {
            match is.checked_sub(was) {
                Some(0) => {}
                Some(d) => out.push((*vni, counter, d)),
                None => return Err(format!("VNI {vni} {counter:?} went back {was} -> {is}")),
            }
        }
    }
    Ok(out)
}

/// What the maps hold that a verdict may send a frame to: the network's
/// endpoints by address, and the crypto device when the network is
/// encrypted.
struct Destinations {
    endpoints: BTreeMap<[u8; 4], Endpoint>,
    crypto_device: Option<u32>,
}

impl Destinations {
    fn of(f: &Fixture, crypto_device: Option<u32>) -> Result<Destinations> {
        Ok(Destinations {
            endpoints: datapath::read_endpoints(f.pin_dir())?
                .into_iter()
                .filter(|(k, _)| k.vni == VNI)
                .map(|(k, e)| (k.addr, e))
                .collect(),
            crypto_device,
        })
    }
}

fn be16(frame: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]))
}

fn addr(frame: &[u8], at: usize) -> [u8; 4] {
    frame[at..at + 4].try_into().expect("four bytes")
}

/// Whether `frame` (Ethernet, IPv4) holds a whole IPv4 packet as a
/// receiving stack checks it first (`ip_rcv_core`): version 4, a header
/// of at least 20 bytes inside the packet, the packet inside the frame.
fn whole_ipv4(frame: &[u8]) -> Result<(), String> {
    if frame.len() < ETH_HDR_LEN + IPV4_HDR_LEN || be16(frame, 12) != usize::from(ETH_P_IP) {
        return Err("no IPv4 frame".into());
    }
    let ip = &frame[ETH_HDR_LEN..];
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = be16(ip, 2);
    if ip[0] >> 4 != 4 || header < IPV4_HDR_LEN || total < header || total > ip.len() {
        return Err(format!(
            "IPv4 header {:02x}, total length {total} in {} bytes",
            ip[0],
            ip.len()
        ));
    }
    Ok(())
}

fn ensure_that(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// What one run of `hook` on `input`, a frame that stands for `packets`
/// wire-size packets (a GSO super-packet's segments), did, checked: the
/// name of the outcome (for the tally), or what was wrong with it.
#[allow(clippy::too_many_arguments, reason = "one run, as it was made")]
fn judge(
    hook: Hook,
    dest: &Destinations,
    packets: u64,
    input: &[u8],
    action: u32,
    output: &[u8],
    before: &Counts,
    after: &Counts,
) -> Result<String, String> {
    let [pass, drop, redirect] = hook.verdicts();
    ensure_that(hook.verdicts().contains(&action), || {
        format!("verdict {action} is none of {pass}, {drop}, {redirect}")
    })?;
    let moved = moved(before, after)?;
    let (g0, g1) = (&before.global, &after.global);
    if hook == Hook::Egress {
        ensure_that(g0 == g1, || {
            format!("egress moved the underlay counters {g0:?} -> {g1:?}")
        })?;
    } else {
        let passed = u64::from(action == pass);
        ensure_that(
            g1.packets - g0.packets == 1
                && g1.passed - g0.passed == passed
                && g1.path_mtu_reports - g0.path_mtu_reports <= passed,
            || format!("underlay counters {g0:?} -> {g1:?}"),
        )?;
    }
    let only = |want: &[(u32, Counter, u64)]| {
        ensure_that(moved == want, || {
            format!("counters moved {moved:?}, want {want:?}")
        })
    };
    if action == drop {
        return match moved[..] {
            [(vni, Counter::Drop(reason), n)]
                if n == packets && (vni == VNI || vni == UNATTRIBUTED_VNI) =>
            {
                Ok(format!("dropped {}", reason.name()))
            }
            _ => Err(format!(
                "dropped, counters moved {moved:?}: want one drop counted {packets} times"
            )),
        };
    }
    if action == pass {
        // What the crypto device opened never reaches the host's stack.
        ensure_that(
            hook != Hook::TcDecap || dest.crypto_device.is_none(),
            || "a frame from the crypto device went on to the host".into(),
        )?;
        let counted = if hook == Hook::Egress {
            only(&[(VNI, Counter::Egress, packets)])?;
            "to the host"
        } else {
            only(&[])?;
            "passed"
        };
        ensure_that(output == input, || "changed on its way to the host".into())?;
        return Ok(counted.into());
    }
    // Redirected.
    if hook != Hook::Egress {
        only(&[
            (VNI, Counter::RxPackets, packets),
            (VNI, Counter::RxBytes, output.len() as u64),
        ])?;
        check_delivery(dest, input, output)?;
        return Ok("delivered".into());
    }
    // ARP and ICMP echo are never GSO: an answer to one counts once.
    match moved[..] {
        [(VNI, Counter::ArpReplies, 1)] => {
            ensure_that(
                output.len() == input.len()
                    && be16(output, 12) == usize::from(ETH_P_ARP)
                    && output[..6] == mac_of(C1)
                    && be16(output, ETH_HDR_LEN + 6) == 2,
                || "ARP reply".into(),
            )?;
            Ok("ARP reply".into())
        }
        [(VNI, Counter::Local, 1)] if output[..6] == mac_of(C1) => {
            whole_ipv4(output)?;
            // From the gateway the request went to.
            ensure_that(
                output.len() == input.len()
                    && output.len() > 34
                    && output[6..12] == GW_MAC
                    && [GATEWAY, OTHER_GATEWAY].contains(&Ipv4Addr::from(addr(output, 26)))
                    && addr(output, 26) == addr(input, 30)
                    && output[34] == 0,
                || "echo reply from the gateway".into(),
            )?;
            Ok("echo reply".into())
        }
        [(VNI, Counter::Local, n)] if n == packets => {
            whole_ipv4(output)?;
            ensure_that(output.len() == input.len(), || "length changed".into())?;
            to_local_endpoint(dest, output, ETH_HDR_LEN)?;
            Ok("switched".into())
        }
        [(VNI, Counter::TxPackets, n), (VNI, Counter::TxBytes, bytes)]
            if n == packets && bytes == input.len() as u64 =>
        {
            check_encapsulated(dest, input, output)?;
            Ok("encapsulated".into())
        }
        [(VNI, Counter::Drop(reason @ (DropReason::TtlExceeded | DropReason::PathMtu)), n)]
            if n == packets =>
        {
            check_icmp_error(input, output)?;
            Ok(format!("answered {}", reason.name()))
        }
        _ => Err(format!("redirected, counters moved {moved:?}")),
    }
}

/// `output` (Ethernet at 0, IPv4 at `ip`) goes to the local endpoint the
/// maps hold for its IPv4 destination, with that endpoint's MAC, and not
/// back to C1: the MAC and the ifindex come from one entry.
fn to_local_endpoint(dest: &Destinations, output: &[u8], ip: usize) -> Result<(), String> {
    let dst = addr(output, ip + 16);
    let ep = dest
        .endpoints
        .get(&dst)
        .ok_or_else(|| format!("to {dst:?}, no endpoint"))?;
    ensure_that(ep.is_local() && output[..6] == ep.mac, || {
        format!("to {dst:?} at {}, endpoint {ep:?}", hex(&output[..6]))
    })
}

/// A decapsulated frame: what followed the outer headers of `input`, with
/// the endpoint's MAC, a whole IPv4 packet for a local endpoint.
fn check_delivery(dest: &Destinations, input: &[u8], output: &[u8]) -> Result<(), String> {
    ensure_that(input.len() > ETH_HDR_LEN, || "delivered a runt".into())?;
    let inner_offset = ETH_HDR_LEN + usize::from(input[ETH_HDR_LEN] & 0x0f) * 4 + 16;
    ensure_that(
        input.len() >= inner_offset && output.len() == input.len() - inner_offset,
        || format!("{} bytes out of {}", output.len(), input.len()),
    )?;
    whole_ipv4(output)?;
    to_local_endpoint(dest, output, ETH_HDR_LEN)?;
    // The rest as it came, but for a congestion mark (TOS and checksum).
    let inner = &input[inner_offset..];
    let same = |r: std::ops::Range<usize>| output[r.clone()] == inner[r];
    ensure_that(
        same(6..15) && same(16..24) && same(26..output.len()),
        || "the inner frame changed".into(),
    )
}

/// An encapsulated frame: `input` behind outer headers that agree with
/// it and each other, to the VTEP of the remote endpoint its inner
/// destination is, through the underlay's next hop.
fn check_encapsulated(dest: &Destinations, input: &[u8], output: &[u8]) -> Result<(), String> {
    ensure_that(output.len() == input.len() + 50, || {
        format!("{} bytes out of {}", output.len(), input.len())
    })?;
    let outer = &output[ETH_HDR_LEN..ETH_HDR_LEN + IPV4_HDR_LEN];
    // To the underlay's next hop, or to the crypto device, which takes
    // any MAC, for an encrypted network.
    let macs = match dest.crypto_device {
        None => [GATEWAY_MAC, UNDERLAY_MAC],
        Some(_) => [[0; 6]; 2],
    };
    ensure_that(
        output[..6] == macs[0]
            && output[6..12] == macs[1]
            && outer[0] == 0x45
            && be16(outer, 2) == output.len() - ETH_HDR_LEN
            && checksum(outer) == 0
            && be16(output, 36) == usize::from(VXLAN_PORT)
            && be16(output, 38) == output.len() - ETH_HDR_LEN - IPV4_HDR_LEN
            && output[42..50] == vxlan_hdr(VNI)[..],
        || format!("outer headers\n{}", hex(&output[..50])),
    )?;
    let inner = &output[50..];
    whole_ipv4(inner)?;
    let dst = addr(inner, ETH_HDR_LEN + 16);
    let ep = dest
        .endpoints
        .get(&dst)
        .ok_or_else(|| format!("to {dst:?}, no endpoint"))?;
    ensure_that(
        !ep.is_local() && addr(outer, 16) == ep.vtep && inner[..6] == ep.mac,
        || format!("to {dst:?} via {:?}, endpoint {ep:?}", addr(outer, 16)),
    )?;
    ensure_that(inner[6..] == input[6..] || inner[6..12] == GW_MAC, || {
        "the inner frame changed".into()
    })
}

/// An ICMP error from C1's gateway back to C1 quoting `input`.
fn check_icmp_error(input: &[u8], output: &[u8]) -> Result<(), String> {
    ensure_that(input.len() > ETH_HDR_LEN, || "answered a runt".into())?;
    let quoted = usize::from(input[ETH_HDR_LEN] & 0x0f) * 4 + 8;
    ensure_that(
        output.len() == ETH_HDR_LEN + IPV4_HDR_LEN + 8 + quoted
            && output[..6] == mac_of(C1)
            && output[6..12] == GW_MAC
            && input.len() >= ETH_HDR_LEN + quoted,
        || format!("{} bytes quoting {quoted}", output.len()),
    )?;
    whole_ipv4(output)?;
    // The quote is the packet as received, but that a router may leave
    // what forwarding changed before the error (RFC 1812 §4.3.2.3): the
    // TTL and the checksum.
    let quote = &output[42..];
    let received = &input[ETH_HDR_LEN..ETH_HDR_LEN + quoted];
    ensure_that(
        checksum(&output[14..34]) == 0
            && checksum(&output[34..]) == 0
            && quote[..8] == received[..8]
            && quote[9..10] == received[9..10]
            && quote[12..] == received[12..]
            && addr(output, 26) == GATEWAY.octets()
            && addr(output, 30) == C1.octets(),
        || "ICMP error".into(),
    )
}

/// Where a valid frame's headers are, for the mutations to aim at.
#[derive(Default)]
struct Layout {
    /// Offsets of IPv4 headers (outer, then inner).
    ipv4: Vec<usize>,
    /// Offsets of UDP headers.
    udp: Vec<usize>,
    /// Offsets of Ethernet headers.
    eth: Vec<usize>,
    /// The VXLAN header.
    vxlan: Option<usize>,
    /// End of the last header: bit flips go up to it.
    headers_end: usize,
}

impl Layout {
    fn of(frame: &[u8]) -> Layout {
        let mut l = Layout::default();
        let mut at = 0;
        loop {
            l.eth.push(at);
            l.headers_end = at + ETH_HDR_LEN;
            match u16::from_be_bytes([frame[at + 12], frame[at + 13]]) {
                ETH_P_IP => {}
                ETH_P_ARP => {
                    l.headers_end = (at + ETH_HDR_LEN + 28).min(frame.len());
                    return l;
                }
                _ => return l,
            }
            let ip = at + ETH_HDR_LEN;
            l.ipv4.push(ip);
            let l4 = ip + usize::from(frame[ip] & 0x0f) * 4;
            l.headers_end = (l4 + 8).min(frame.len());
            match frame[ip + 9] {
                IPPROTO_UDP => l.udp.push(l4),
                IPPROTO_TCP => l.headers_end = (l4 + 20).min(frame.len()),
                // ICMP: its header and what it quotes.
                _ => l.headers_end = (l4 + 8 + 28).min(frame.len()),
            }
            if frame[ip + 9] == IPPROTO_UDP
                && u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]) == VXLAN_PORT
                && l.vxlan.is_none()
            {
                l.vxlan = Some(l4 + 8);
                at = l4 + 16;
                continue;
            }
            return l;
        }
    }
}

/// A mutated frame and what was done to it.
struct Mutant {
    what: String,
    frame: Vec<u8>,
}

fn set16(frame: &mut [u8], at: usize, value: usize) {
    frame[at..at + 2].copy_from_slice(&(value as u16).to_be_bytes());
}

/// Makes the header checksum of the IPv4 header at `ip` valid again.
fn fix_ipv4_checksum(frame: &mut [u8], ip: usize) {
    if ip >= frame.len() {
        return;
    }
    let len = usize::from(frame[ip] & 0x0f) * 4;
    if len < IPV4_HDR_LEN || ip + len > frame.len() {
        return;
    }
    frame[ip + 10..ip + 12].fill(0);
    let c = checksum(&frame[ip..ip + len]);
    frame[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}

/// Inserts `bytes` at `at`, growing every IPv4 and UDP length in front of
/// it that covers it (outer headers of a VXLAN frame) and their checksums.
fn insert_at(seed: &[u8], layout: &Layout, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut out = seed[..at].to_vec();
    out.extend_from_slice(bytes);
    out.extend_from_slice(&seed[at..]);
    for &ip in layout.ipv4.iter().filter(|&&ip| ip < at) {
        let total = be16(&out, ip + 2) + bytes.len();
        set16(&mut out, ip + 2, total);
        fix_ipv4_checksum(&mut out, ip);
    }
    for &udp in layout.udp.iter().filter(|&&udp| udp < at) {
        let len = be16(&out, udp + 4) + bytes.len();
        set16(&mut out, udp + 4, len);
    }
    out
}

/// Every mutation of `seed`, and `random` scrambled ones from `rng`.
fn mutants(seed: &[u8], rng: &mut Xorshift, random: usize) -> Vec<Mutant> {
    let layout = Layout::of(seed);
    let mut out = Vec::new();
    let mut push = |what: String, frame: Vec<u8>| out.push(Mutant { what, frame });

    // Cut at every length, and grown by trailing bytes.
    for len in 0..seed.len() {
        push(format!("cut to {len}"), seed[..len].to_vec());
    }
    for extra in [1, 4, 26, 27, 64] {
        let mut frame = seed.to_vec();
        frame.extend((0..extra).map(|i| i as u8));
        push(format!("{extra} trailing bytes"), frame);
    }
    // Every bit of every header.
    for bit in 0..layout.headers_end * 8 {
        let mut frame = seed.to_vec();
        frame[bit / 8] ^= 0x80 >> (bit % 8);
        push(format!("bit {bit} flipped"), frame);
    }
    // Header fields set to lies, with the IPv4 checksum kept valid and
    // not.
    let lies = |was: usize| {
        let mut v = vec![0, 1, 7, 8, 19, 20, 21, 0x7fff, 0xffff];
        for d in [1, 2, 4, 8, 20, 26, 27, 50] {
            v.push(was.wrapping_add(d) & 0xffff);
            v.push(was.wrapping_sub(d) & 0xffff);
        }
        v
    };
    for (n, &ip) in layout.ipv4.iter().enumerate() {
        let header = |field: &str| format!("IPv4 header {n} {field}");
        for value in lies(be16(seed, ip + 2)) {
            for fix in [true, false] {
                let mut frame = seed.to_vec();
                set16(&mut frame, ip + 2, value);
                if fix {
                    fix_ipv4_checksum(&mut frame, ip);
                }
                push(
                    header(&format!("total length {value} (fixed {fix})")),
                    frame,
                );
            }
        }
        for vihl in [0x40, 0x44, 0x45, 0x46, 0x4f, 0x55, 0x65, 0x35, 0x00, 0xff] {
            let mut frame = seed.to_vec();
            frame[ip] = vihl;
            fix_ipv4_checksum(&mut frame, ip);
            push(header(&format!("version/IHL {vihl:#04x}")), frame);
        }
        for frags in [
            0x2000, 0x2001, 0x0001, 0x00b9, 0x1fff, 0x8000, 0x6000, 0x0000,
        ] {
            let mut frame = seed.to_vec();
            set16(&mut frame, ip + 6, frags);
            fix_ipv4_checksum(&mut frame, ip);
            push(header(&format!("flags/offset {frags:#06x}")), frame);
        }
        for proto in [0, 1, 6, 17, 47, 255] {
            let mut frame = seed.to_vec();
            frame[ip + 9] = proto;
            fix_ipv4_checksum(&mut frame, ip);
            push(header(&format!("protocol {proto}")), frame);
        }
        for ttl in [0, 1, 2, 255] {
            let mut frame = seed.to_vec();
            frame[ip + 8] = ttl;
            fix_ipv4_checksum(&mut frame, ip);
            push(header(&format!("TTL {ttl}")), frame);
        }
        for tos in [0x01, 0x02, 0x03, 0xff] {
            let mut frame = seed.to_vec();
            frame[ip + 1] = tos;
            fix_ipv4_checksum(&mut frame, ip);
            push(header(&format!("TOS {tos:#04x}")), frame);
        }
        for check in [0, 0xffff] {
            let mut frame = seed.to_vec();
            set16(&mut frame, ip + 10, check);
            push(header(&format!("checksum {check:#06x}")), frame);
        }
        // Options: NOPs and an end of list, 4 to 40 bytes, lengths grown.
        let ihl = usize::from(seed[ip] & 0x0f) * 4;
        for words in 1..=(60 - ihl) / 4 {
            let mut options = vec![1u8; words * 4 - 1];
            options.push(0);
            let mut frame = insert_at(seed, &layout, ip + ihl, &options);
            frame[ip] += words as u8;
            fix_ipv4_checksum(&mut frame, ip);
            push(header(&format!("{} bytes of options", words * 4)), frame);
            // The same, IHL not grown: the options read as the payload.
            let frame = insert_at(seed, &layout, ip + ihl, &options);
            push(
                header(&format!("{} bytes of stray options", words * 4)),
                frame,
            );
        }
    }
    for (n, &udp) in layout.udp.iter().enumerate() {
        for value in lies(be16(seed, udp + 4)) {
            let mut frame = seed.to_vec();
            set16(&mut frame, udp + 4, value);
            push(format!("UDP header {n} length {value}"), frame);
        }
        for port in [0, 4789, 4790, 8472, 0xffff] {
            let mut frame = seed.to_vec();
            set16(&mut frame, udp + 2, port);
            push(format!("UDP header {n} port {port}"), frame);
        }
    }
    if let Some(vx) = layout.vxlan {
        for flags in [0x00, 0x08, 0x0c, 0xff, 0xf7] {
            let mut frame = seed.to_vec();
            frame[vx] = flags;
            push(format!("VXLAN flags {flags:#04x}"), frame);
        }
        for vni in [0, 1, VNI - 1, VNI + 1, 0x00ff_ffff, UNATTRIBUTED_VNI] {
            let mut frame = seed.to_vec();
            frame[vx + 4..vx + 7].copy_from_slice(&vni.to_be_bytes()[1..]);
            push(format!("VNI {vni}"), frame);
        }
        for reserved in [1, 3, 7] {
            let mut frame = seed.to_vec();
            frame[vx + reserved] = 0xff;
            push(format!("VXLAN reserved byte {reserved} set"), frame);
        }
    }
    for (n, &eth) in layout.eth.iter().enumerate() {
        for ethertype in [
            0x0000, 0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8, 0x88cc, 0xffff,
        ] {
            let mut frame = seed.to_vec();
            set16(&mut frame, eth + 12, ethertype);
            push(format!("Ethernet {n} EtherType {ethertype:#06x}"), frame);
        }
        // An 802.1Q (and a QinQ) tag before the EtherType.
        for tag in [
            &[0x81, 0x00, 0x00, 0x05][..],
            &[0x88, 0xa8, 0, 1, 0x81, 0, 0, 2],
        ] {
            let frame = insert_at(seed, &layout, eth + 12, tag);
            push(format!("Ethernet {n} tagged {}", hex(tag)), frame);
        }
        for mac in [
            [0xff; 6],
            [0x01, 0, 0x5e, 0, 0, 1],
            [0; 6],
            GW_MAC,
            mac_of(C1),
        ] {
            let mut frame = seed.to_vec();
            frame[eth..eth + 6].copy_from_slice(&mac);
            push(format!("Ethernet {n} to {}", hex(&mac)), frame);
        }
    }
    // Scrambled: a few random bytes in the headers, sometimes cut too.
    for i in 0..random {
        let mut frame = seed.to_vec();
        let mut what = format!("random {i}:");
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(layout.headers_end);
            frame[at] = rng.byte();
            let _ = write!(what, " [{at}]={:#04x}", frame[at]);
        }
        if rng.below(4) == 0 {
            let len = rng.below(frame.len() + 1);
            frame.truncate(len);
            let _ = write!(what, " cut to {len}");
        }
        for &ip in &layout.ipv4 {
            if rng.below(2) == 0 {
                fix_ipv4_checksum(&mut frame, ip);
            }
        }
        push(what, frame);
    }
    out
}

/// A TCP segment (ACK, data offset 5) with `payload`.
fn tcp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&dst_port.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    segment.extend_from_slice(payload);
    segment
}

/// Valid frames for `hook`, as the golden tests send them, with the
/// verdict each gets as it is.
fn seeds(hook: Hook) -> Vec<(&'static str, Vec<u8>, u32)> {
    let outside = Ipv4Addr::new(203, 0, 113, 1);
    let tcp_to = |src, dst, dst_mac| {
        eth(
            dst_mac,
            mac_of(src),
            ETH_P_IP,
            &ipv4(src, dst, IPPROTO_TCP, &tcp(40000, 80, &[7; 100])),
        )
    };
    if hook == Hook::Egress {
        let mut options = vec![1u8; 11];
        options.push(0);
        return vec![
            (
                "encapsulated echo",
                echo(C1, C2, mac_of(C2)),
                TC_ACT_REDIRECT,
            ),
            (
                "encapsulated TCP",
                tcp_to(C1, C2, mac_of(C2)),
                TC_ACT_REDIRECT,
            ),
            ("switched echo", echo(C1, C3, mac_of(C3)), TC_ACT_REDIRECT),
            ("routed, local", echo(C1, D1, GW_MAC), TC_ACT_REDIRECT),
            ("routed, remote", echo(C1, D2, GW_MAC), TC_ACT_REDIRECT),
            (
                "TTL 1 at the gateway",
                echo_ttl(C1, D1, GW_MAC, 1, 56),
                TC_ACT_REDIRECT,
            ),
            (
                "TTL 1 with options",
                with_ipv4_options(&echo_ttl(C1, D1, GW_MAC, 1, 56), &options),
                TC_ACT_REDIRECT,
            ),
            (
                "DF beyond the underlay",
                echo_ttl(C1, C2, mac_of(C2), 64, 1488 - 28),
                TC_ACT_REDIRECT,
            ),
            (
                "echo to the gateway",
                echo(C1, GATEWAY, GW_MAC),
                TC_ACT_REDIRECT,
            ),
            ("to the outside", echo(C1, outside, GW_MAC), TC_ACT_OK),
            (
                "UDP to the outside",
                udp_out(Ipv4Addr::new(203, 0, 113, 7), 4790),
                TC_ACT_OK,
            ),
            (
                "ARP for an endpoint",
                arp_request(mac_of(C1), C1, C2),
                TC_ACT_REDIRECT,
            ),
            (
                "ARP for the gateway",
                arp_request(mac_of(C1), C1, GATEWAY),
                TC_ACT_REDIRECT,
            ),
        ];
    }
    let [_, _, delivered] = hook.verdicts();
    let [passed, dropped, _] = hook.verdicts();
    let short = eth(
        mac_of(C1),
        mac_of(C2),
        ETH_P_IP,
        &ipv4(C2, C1, IPPROTO_ICMP, &icmp_echo(7, 1, 0)),
    );
    let mut padded = short;
    padded.resize(60, 0);
    vec![
        (
            "echo for C1",
            vxlan_from(REMOTE_VTEP, VNI, &echo(C2, C1, mac_of(C1))),
            delivered,
        ),
        (
            "TCP for C3",
            vxlan_from(REMOTE_VTEP, VNI, &tcp_to(C2, C3, mac_of(C3))),
            delivered,
        ),
        (
            "behind outer options",
            with_ipv4_options(
                &vxlan_from(REMOTE_VTEP, VNI, &echo(C2, C1, mac_of(C1))),
                &[1, 1, 1, 0],
            ),
            delivered,
        ),
        (
            "padded short inner",
            vxlan_from(REMOTE_VTEP, VNI, &padded),
            delivered,
        ),
        ("CE over ECT(0)", ecn_case(0xb8 | CE, ECT0).0, delivered),
        (
            "path MTU report",
            frag_needed_report(REMOTE_VTEP, 4789, 1400),
            passed,
        ),
        ("other UDP", other_udp_to_this_vtep(), passed),
        (
            "from a stranger",
            vxlan_from(Ipv4Addr::new(192, 0, 2, 66), VNI, &echo(C2, C1, mac_of(C1))),
            dropped,
        ),
    ]
}

/// Whether BPF_PROG_TEST_RUN refuses `frame` before any program sees it:
/// shorter than Ethernet, or (at TC) than the IPv4 or IPv6 header its
/// EtherType announces.
fn refused_by_test_run(frame: &[u8]) -> bool {
    frame.len() < ETH_HDR_LEN
        || match be16(frame, 12) {
            0x0800 => frame.len() < ETH_HDR_LEN + IPV4_HDR_LEN,
            0x86dd => frame.len() < ETH_HDR_LEN + 40,
            _ => false,
        }
}

/// The network the fixture's maps hold.
#[derive(Clone, Copy)]
enum Network {
    Clear,
    /// Encrypted, its remote VTEP keyed, the crypto device up.
    Encrypted,
}

/// Scrambled mutants per seed, on top of the systematic ones.
const RANDOM_PER_SEED: usize = 200;

/// Runs every mutant of every seed of `hook`; fails with the packets that
/// were not accounted for.
fn every_mutant_is_accounted_for(
    hook: Hook,
    network: Network,
    tag: &str,
    rng_seed: u64,
) -> Result<()> {
    let mut f = fixture(tag)?;
    let crypto_device = match network {
        Network::Clear => None,
        Network::Encrypted => {
            f.set_network_flags(network_flags::ENCRYPTED)?;
            f.set_remote_vtep_flags(vtep_flags::ALLOWED | vtep_flags::KEYED)?;
            Some(f.add_crypto_device()?)
        }
    };
    // The flow caches are per CPU: one CPU makes a run reproducible.
    testbed::stay_on_one_cpu()?;
    let dest = Destinations::of(&f, crypto_device)?;
    // Decap of an encrypted network's frames: as the agent writes them to
    // the crypto device, decrypted.
    let ctx = match (hook, crypto_device) {
        (Hook::TcDecap, Some(device)) => Some(skb_ctx(device)),
        _ => hook.ctx(),
    };
    let [pass, drop, _] = hook.verdicts();
    let mut rng = Xorshift(rng_seed);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    // Violations by kind (the message without its numbers): how many, and
    // the first one in full.
    let mut violations: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut refused = 0;
    for (name, seed, verdict) in seeds(hook) {
        let verdict = match ctx {
            Some(_) if verdict == pass && crypto_device.is_some() && hook == Hook::TcDecap => drop,
            _ => verdict,
        };
        let out = f
            .datapath
            .test_run(hook.program(), &seed, ctx.as_deref(), 1)?;
        ensure!(
            out.action == verdict,
            "{name}: the seed itself got {}, want {verdict}",
            out.action
        );
        for m in mutants(&seed, &mut rng, RANDOM_PER_SEED) {
            // At TC, one in four as a GSO super-packet of 2 to 4 segments.
            let (ctx, packets, what) = match &ctx {
                Some(plain) if rng.below(4) == 0 => {
                    let segs = 2 + rng.below(3) as u32;
                    let ifindex = u32::from_ne_bytes(plain[40..44].try_into()?);
                    let gso = skb_ctx_gso(ifindex, segs, 1400);
                    (
                        Some(gso),
                        u64::from(segs),
                        format!("{}, GSO x{segs}", m.what),
                    )
                }
                _ => (ctx.clone(), 1, m.what),
            };
            let before = counts(&f)?;
            let out = match f
                .datapath
                .test_run(hook.program(), &m.frame, ctx.as_deref(), 1)
            {
                Ok(out) => out,
                Err(_) if refused_by_test_run(&m.frame) => {
                    refused += 1;
                    continue;
                }
                Err(e) => return Err(e.context(format!("{name}, {what}"))),
            };
            let after = counts(&f)?;
            let judged = judge(
                hook,
                &dest,
                packets,
                &m.frame,
                out.action,
                &out.output,
                &before,
                &after,
            );
            match judged {
                Ok(outcome) => *tally.entry(outcome).or_default() += 1,
                Err(why) => {
                    let kind = format!("{name}: {why}").replace(|c: char| c.is_ascii_digit(), "");
                    violations
                        .entry(kind)
                        .or_insert_with(|| {
                            let first = format!(
                                "{name}, {what}: {why}\n  verdict {}\n  input\n{}\n  output\n{}",
                                out.action,
                                hex(&m.frame),
                                hex(&out.output)
                            );
                            (0, first)
                        })
                        .0 += 1;
                }
            }
        }
    }
    let unaccounted: usize = violations.values().map(|(n, _)| n).sum();
    let total = tally.values().sum::<usize>() + unaccounted;
    eprintln!(
        "{}: {total} mutants ({refused} refused by the kernel), {unaccounted} unaccounted; outcomes {tally:?}",
        hook.program(),
    );
    ensure!(
        violations.is_empty(),
        "{unaccounted} of {total} mutants through {} not accounted for, by kind (count, first):\n{}",
        hook.program(),
        violations
            .values()
            .map(|(n, first)| format!("{n} like {first}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The mutations reach every kind of outcome the program has: a run
    // that only ever dropped would prove little.
    let kinds: BTreeSet<&str> = tally
        .keys()
        .map(|k| k.split(' ').next().unwrap_or(""))
        .collect();
    let want: &[&str] = match hook {
        Hook::Egress => &[
            "dropped",
            "to",
            "ARP",
            "echo",
            "switched",
            "encapsulated",
            "answered",
        ],
        Hook::TcDecap if crypto_device.is_some() => &["dropped", "delivered"],
        _ => &["dropped", "passed", "delivered"],
    };
    ensure!(
        want.iter().all(|k| kinds.contains(k)),
        "outcomes {kinds:?}, want all of {want:?}"
    );
    Ok(())
}

#[test]
fn every_mutated_frame_through_xdp_decap_is_accounted_for() -> Result<()> {
    every_mutant_is_accounted_for(
        Hook::XdpDecap,
        Network::Clear,
        "gold-mut-xdp",
        0x9e37_79b9_7f4a_7c15,
    )
}

#[test]
fn every_mutated_frame_through_tc_decap_is_accounted_for() -> Result<()> {
    every_mutant_is_accounted_for(
        Hook::TcDecap,
        Network::Clear,
        "gold-mut-tc",
        0xd1b5_4a32_d192_ed03,
    )
}

#[test]
fn every_mutated_frame_the_crypto_device_opened_is_accounted_for() -> Result<()> {
    every_mutant_is_accounted_for(
        Hook::TcDecap,
        Network::Encrypted,
        "gold-mut-crypto",
        0x2545_f491_4f6c_dd1d,
    )
}

#[test]
fn every_mutated_frame_through_container_egress_is_accounted_for() -> Result<()> {
    every_mutant_is_accounted_for(
        Hook::Egress,
        Network::Clear,
        "gold-mut-egress",
        0xa076_1d64_78bd_642f,
    )
}

#[test]
fn every_mutated_frame_of_an_encrypted_network_through_egress_is_accounted_for() -> Result<()> {
    every_mutant_is_accounted_for(
        Hook::Egress,
        Network::Encrypted,
        "gold-mut-egress-enc",
        0x6a09_e667_f3bc_c908,
    )
}
