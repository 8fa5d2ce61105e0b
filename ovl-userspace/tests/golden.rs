//! Golden packets through the kernel programs with BPF_PROG_TEST_RUN, no
//! interfaces involved: for each input frame, the expected action, output
//! bytes and counter deltas (Katran's fixture style).
//!
//! Runs in a namespace of its own holding one stand-in underlay device, so the
//! FIB lookups of encapsulation see a known route and neighbour.

#[allow(dead_code, reason = "shared with the micro-benchmark; each uses part")]
mod testbed;

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use ovl_common::wire::{ETH_P_IP, IPPROTO_UDP};
use ovl_common::{
    DropReason, VniCounters,
    counters::UNATTRIBUTED_VNI,
    maps::{names, programs},
};
use ovl_userspace::datapath;
use testbed::{
    action::{TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    fixture::{
        Fixture, GATEWAY_MAC, LOCAL_CONTAINER as C1, LOCAL_VTEP, NEIGHBOUR_CONTAINER as C3,
        REMOTE_CONTAINER as C2, REMOTE_VTEP, TEST_RUN_IFINDEX, UNDERLAY_MAC, VNI, skb_ctx,
    },
    frames::{
        IPPROTO_ICMP, arp_reply, arp_request, container_mac as mac_of, ethernet as eth, hex,
        icmp_echo, internet_checksum as checksum, ipv4, udp, vxlan_frame,
        vxlan_header as vxlan_hdr,
    },
};

/// The shared testbed with forwarding on, so encapsulation resolves its
/// next hop through the FIB and writes known MACs.
fn fixture(tag: &str) -> Result<Fixture> {
    let f = Fixture::new(tag)?;
    f.set_forwarding(true)?;
    Ok(f)
}

/// Counters of `vni` in the fixture's pinned maps.
fn counters(f: &Fixture, vni: u32) -> Result<VniCounters> {
    Ok(datapath::read_counters(f.pin_dir())?
        .get(&vni)
        .copied()
        .unwrap_or_default())
}

/// Runs `program` on `input`; returns action and output and checks that the
/// counters of `vni` moved exactly as `expect` says.
fn run(
    f: &Fixture,
    program: &str,
    input: &[u8],
    ctx: Option<&[u8]>,
    vni: u32,
    expect: impl FnOnce(&mut VniCounters),
) -> Result<(u32, Vec<u8>)> {
    let before = counters(f, vni)?;
    let out = f.datapath.test_run(program, input, ctx, 1)?;
    let mut want = before;
    expect(&mut want);
    let got = counters(f, vni)?;
    ensure!(
        got == want,
        "{program}: counters of VNI {vni}\n  got  {got:?}\n  want {want:?}"
    );
    Ok((out.action, out.output))
}

/// Destination MAC of the frames the tests put on the underlay (decap does
/// not look at it).
const ARRIVAL_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];

fn vxlan_from(src_vtep: Ipv4Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    vxlan_frame(src_vtep, LOCAL_VTEP, ARRIVAL_MAC, GATEWAY_MAC, vni, inner)
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr, dst_mac: [u8; 6]) -> Vec<u8> {
    eth(
        dst_mac,
        mac_of(src),
        ETH_P_IP,
        &ipv4(src, dst, IPPROTO_ICMP, &icmp_echo(7, 1, 56)),
    )
}

#[test]
fn every_program_and_map_of_the_contract_is_in_the_object() -> Result<()> {
    let f = fixture("gold-names")?;
    for name in names::ALL {
        ensure!(f.pin_dir().join(name).exists(), "map {name} not pinned");
    }
    let ctx = skb_ctx(TEST_RUN_IFINDEX);
    for name in programs::ALL {
        // A program that is missing fails the run with "program missing".
        let ctx = (name != programs::XDP_DECAP).then_some(ctx.as_slice());
        f.datapath.test_run(name, &[0u8; 64], ctx, 1)?;
    }
    Ok(())
}

#[test]
fn decap_delivers_vxlan_for_a_local_endpoint() -> Result<()> {
    let f = fixture("gold-decap")?;
    // The sender wrote a wrong inner destination MAC; ovl sets the right one.
    let inner = echo(C2, C1, [0x02, 0x42, 0, 0, 0, 0]);
    let input = vxlan_from(REMOTE_VTEP, VNI, &inner);
    let expected = echo(C2, C1, mac_of(C1));
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        let ctx = (program == programs::TC_DECAP).then(|| skb_ctx(TEST_RUN_IFINDEX));
        let (action, out) = run(&f, program, &input, ctx.as_deref(), VNI, |c| {
            c.rx_packets += 1;
            c.rx_bytes += expected.len() as u64;
        })?;
        let want_action = if program == programs::XDP_DECAP {
            XDP_REDIRECT
        } else {
            TC_ACT_REDIRECT
        };
        ensure!(action == want_action, "{program}: action {action}");
        ensure!(
            out == expected,
            "{program}: output\n{}\nwant\n{}",
            hex(&out),
            hex(&expected)
        );
    }
    Ok(())
}

#[test]
fn decap_drops_vxlan_from_unknown_vtep() -> Result<()> {
    let f = fixture("gold-spoof")?;
    let input = vxlan_from(Ipv4Addr::new(192, 0, 2, 66), VNI, &echo(C2, C1, mac_of(C1)));
    let (action, _) = run(&f, programs::XDP_DECAP, &input, None, VNI, |c| {
        c.drops[DropReason::UnknownVtep as usize] += 1
    })?;
    ensure!(action == XDP_DROP, "action {action}");
    Ok(())
}

#[test]
fn decap_drops_unknown_vni_malformed_and_misaddressed_vxlan() -> Result<()> {
    let f = fixture("gold-bad")?;
    let good_inner = echo(C2, C1, mac_of(C1));
    let cases: Vec<(&str, Vec<u8>, u32, DropReason)> = vec![
        (
            "unknown VNI",
            vxlan_from(REMOTE_VTEP, 999, &good_inner),
            UNATTRIBUTED_VNI,
            DropReason::UnknownVni,
        ),
        (
            "I flag clear",
            {
                let mut p = vxlan_from(REMOTE_VTEP, VNI, &good_inner);
                p[42] = 0;
                p
            },
            UNATTRIBUTED_VNI,
            DropReason::Malformed,
        ),
        (
            "truncated inside VXLAN header",
            vxlan_from(REMOTE_VTEP, VNI, &good_inner)[..46].to_vec(),
            UNATTRIBUTED_VNI,
            DropReason::Malformed,
        ),
        (
            "inner destination is remote",
            vxlan_from(REMOTE_VTEP, VNI, &echo(C1, C2, mac_of(C2))),
            VNI,
            DropReason::NoEndpoint,
        ),
        (
            "inner ARP",
            vxlan_from(REMOTE_VTEP, VNI, &arp_request(mac_of(C2), C2, C1)),
            VNI,
            DropReason::Unsupported,
        ),
    ];
    for (what, input, vni, reason) in cases {
        let (action, _) = run(&f, programs::XDP_DECAP, &input, None, vni, |c| {
            c.drops[reason as usize] += 1
        })
        .with_context(|| what.to_owned())?;
        ensure!(action == XDP_DROP, "{what}: action {action}");
    }
    Ok(())
}

#[test]
fn xdp_decap_refuses_frames_beyond_the_network_mtu_instead_of_counting_them_delivered() -> Result<()>
{
    let f = fixture("gold-xdp-big")?;
    // A 1500-byte inner packet on a network with MTU 1450: what generic XDP
    // sees of a GRO super-packet. The redirect would fail after the fact.
    let big = eth(
        mac_of(C1),
        mac_of(C2),
        ETH_P_IP,
        &ipv4(C2, C1, IPPROTO_ICMP, &icmp_echo(7, 1, 1472)),
    );
    let input = vxlan_from(REMOTE_VTEP, VNI, &big);
    let (action, _) = run(&f, programs::XDP_DECAP, &input, None, VNI, |c| {
        c.drops[DropReason::TooBig as usize] += 1
    })?;
    ensure!(action == XDP_DROP, "action {action}");
    Ok(())
}

#[test]
fn decap_passes_everything_that_is_not_ovls_vxlan_untouched() -> Result<()> {
    let f = fixture("gold-pass")?;
    let other_udp = eth(
        ARRIVAL_MAC,
        GATEWAY_MAC,
        ETH_P_IP,
        &ipv4(
            REMOTE_VTEP,
            LOCAL_VTEP,
            IPPROTO_UDP,
            &udp(5000, 53, &[0; 20]),
        ),
    );
    let to_other_host = vxlan_frame(
        REMOTE_VTEP,
        Ipv4Addr::new(192, 0, 2, 11),
        ARRIVAL_MAC,
        GATEWAY_MAC,
        VNI,
        &echo(C2, C1, mac_of(C1)),
    );
    let arp = arp_request(GATEWAY_MAC, Ipv4Addr::new(192, 0, 2, 1), LOCAL_VTEP);
    for (what, input) in [
        ("other UDP", other_udp),
        ("VXLAN for another host", to_other_host),
        ("ARP", arp),
    ] {
        let g0 = datapath::read_global(f.pin_dir())?;
        let (action, out) = run(&f, programs::XDP_DECAP, &input, None, VNI, |_| {})?;
        let g1 = datapath::read_global(f.pin_dir())?;
        ensure!(action == XDP_PASS, "{what}: action {action}");
        ensure!(out == input, "{what}: packet changed");
        ensure!(
            g1.packets - g0.packets == 1 && g1.passed - g0.passed == 1,
            "{what}: global counters {g0:?} -> {g1:?}"
        );
    }
    Ok(())
}

#[test]
fn egress_answers_arp_for_an_endpoint_of_the_network() -> Result<()> {
    let f = fixture("gold-arp")?;
    let request = arp_request(mac_of(C1), C1, C2);
    let (action, out) = run(
        &f,
        programs::TC_EGRESS,
        &request,
        Some(&skb_ctx(TEST_RUN_IFINDEX)),
        VNI,
        |c| c.arp_replies += 1,
    )?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    let want = arp_reply(mac_of(C2), C2, mac_of(C1), C1);
    ensure!(out == want, "reply\n{}\nwant\n{}", hex(&out), hex(&want));

    let unknown = arp_request(mac_of(C1), C1, Ipv4Addr::new(198, 18, 0, 200));
    let (action, _) = run(
        &f,
        programs::TC_EGRESS,
        &unknown,
        Some(&skb_ctx(TEST_RUN_IFINDEX)),
        VNI,
        |c| c.drops[DropReason::NoEndpoint as usize] += 1,
    )?;
    ensure!(action == TC_ACT_SHOT, "unknown target: action {action}");
    Ok(())
}

#[test]
fn egress_switches_to_a_local_endpoint_without_encapsulation() -> Result<()> {
    let f = fixture("gold-local")?;
    let input = echo(C1, C3, [0x02, 0x42, 0, 0, 0, 1]);
    let (action, out) = run(
        &f,
        programs::TC_EGRESS,
        &input,
        Some(&skb_ctx(TEST_RUN_IFINDEX)),
        VNI,
        |c| c.local_packets += 1,
    )?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    ensure!(out == echo(C1, C3, mac_of(C3)), "output\n{}", hex(&out));
    Ok(())
}

#[test]
fn egress_encapsulates_to_the_remote_vtep_per_rfc7348() -> Result<()> {
    let f = fixture("gold-encap")?;
    let inner = echo(C1, C2, mac_of(C2));
    let (action, out) = run(
        &f,
        programs::TC_EGRESS,
        &inner,
        Some(&skb_ctx(TEST_RUN_IFINDEX)),
        VNI,
        |c| {
            c.tx_packets += 1;
            c.tx_bytes += inner.len() as u64;
        },
    )?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    ensure!(out.len() == inner.len() + 50, "length {}", out.len());
    // Outer Ethernet: from the underlay device to the gateway's MAC (FIB + neighbour).
    ensure!(
        out[0..6] == GATEWAY_MAC && out[6..12] == UNDERLAY_MAC && out[12..14] == [0x08, 0x00],
        "outer eth\n{}",
        hex(&out[..14])
    );
    // Outer IPv4: version/IHL, length, DF, TTL 64, UDP, VTEP addresses, valid checksum.
    let ip = &out[14..34];
    ensure!(
        ip[0] == 0x45 && u16::from_be_bytes([ip[2], ip[3]]) as usize == out.len() - 14,
        "ip\n{}",
        hex(ip)
    );
    ensure!(
        ip[6] == 0x40 && ip[8] == 64 && ip[9] == IPPROTO_UDP,
        "ip flags/ttl/proto\n{}",
        hex(ip)
    );
    ensure!(
        ip[12..16] == LOCAL_VTEP.octets() && ip[16..20] == REMOTE_VTEP.octets(),
        "ip addrs\n{}",
        hex(ip)
    );
    ensure!(
        checksum(ip) == 0,
        "outer IPv4 checksum does not verify\n{}",
        hex(ip)
    );
    // UDP: source port from the flow hash in 49152..=65535, destination 4789.
    let sport = u16::from_be_bytes([out[34], out[35]]);
    ensure!(sport >= 49152, "source port {sport}");
    ensure!(out[36..38] == [0x12, 0xb5], "destination port");
    ensure!(
        u16::from_be_bytes([out[38], out[39]]) as usize == out.len() - 34,
        "udp length"
    );
    // VXLAN: I flag, VNI 4096; then the inner frame unchanged.
    ensure!(
        out[42..50] == vxlan_hdr(VNI)[..],
        "vxlan\n{}",
        hex(&out[42..50])
    );
    ensure!(out[50..] == inner[..], "inner frame changed");
    Ok(())
}

#[test]
fn egress_drops_what_it_cannot_switch_by_reason() -> Result<()> {
    let f = fixture("gold-egress-drops")?;
    let ipv6 = eth(mac_of(C2), mac_of(C1), 0x86dd, &[0x60; 40]);
    let unknown = echo(C1, Ipv4Addr::new(198, 18, 0, 99), mac_of(C2));
    let broadcast = echo(C1, Ipv4Addr::new(198, 18, 0, 255), [0xff; 6]);
    let too_big = eth(
        mac_of(C2),
        mac_of(C1),
        ETH_P_IP,
        &ipv4(C1, C2, IPPROTO_ICMP, &icmp_echo(7, 1, 1460)),
    );
    // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header, so
    // the truncated case is an ARP request cut short.
    let runt = arp_request(mac_of(C1), C1, C2)[..24].to_vec();
    let cases = [
        ("IPv6", ipv6, DropReason::Unsupported),
        ("unknown destination", unknown, DropReason::NoEndpoint),
        ("broadcast", broadcast, DropReason::NoEndpoint),
        (
            "1488-byte packet on a 1500 underlay",
            too_big,
            DropReason::TooBig,
        ),
        ("truncated ARP", runt, DropReason::Malformed),
    ];
    for (what, input, reason) in cases {
        let (action, _) = run(
            &f,
            programs::TC_EGRESS,
            &input,
            Some(&skb_ctx(TEST_RUN_IFINDEX)),
            VNI,
            |c| c.drops[reason as usize] += 1,
        )
        .with_context(|| what)?;
        ensure!(action == TC_ACT_SHOT, "{what}: action {action}");
    }
    Ok(())
}
