//! Golden packets through the kernel programs with BPF_PROG_TEST_RUN, no
//! interfaces involved: for each input frame, the expected action, output
//! bytes and counter deltas (Katran's fixture style).
//!
//! Runs in a namespace of its own holding one stand-in underlay device, so the
//! FIB lookups of encapsulation see a known route and neighbour.

#[allow(dead_code, reason = "shared with the micro-benchmark; each uses part")]
mod testbed;

#[path = "golden/mutations.rs"]
mod mutations;

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use ovl_common::wire::{
    ANYCAST_GATEWAY_MAC as GW_MAC, ETH_HDR_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_HDR_LEN,
};
use ovl_common::{
    DropReason, Endpoint, NextHop, VniAddr, VniCounters,
    counters::UNATTRIBUTED_VNI,
    maps::{flow_cache, names, network_flags, next_hop_via, programs, vtep_flags},
    wire::NEXT_HOP_TTL_NS,
};
use ovl_userspace::{datapath, next_hops};
use testbed::{
    action::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    fixture::{
        Fixture, GATEWAY, GATEWAY_MAC, LOCAL_CONTAINER as C1, LOCAL_VTEP,
        NEIGHBOUR_CONTAINER as C3, OTHER_GATEWAY, OTHER_SUBNET_CONTAINER as D1,
        OTHER_SUBNET_REMOTE as D2, REMOTE_CONTAINER as C2, REMOTE_VTEP, TEST_RUN_IFINDEX,
        UNDERLAY_MAC, VNI, skb_ctx, skb_ctx_gso,
    },
    frames::{
        IPPROTO_ICMP, arp_reply, arp_request, container_mac as mac_of, ethernet as eth, hex,
        icmp_echo, internet_checksum as checksum, ipv4, ipv4_ttl, udp, vxlan_frame,
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
    both_hooks_deliver(&f, &input, &expected)
}

/// Both decap hooks (XDP and TC) deliver `input` to the local endpoint as
/// `expected`, counted once each on `VNI`.
fn both_hooks_deliver(f: &Fixture, input: &[u8], expected: &[u8]) -> Result<()> {
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        delivers(f, program, input, expected)?;
    }
    Ok(())
}

/// Decap hook `program` delivers `input` to the local endpoint as
/// `expected`, counted once on `VNI`.
fn delivers(f: &Fixture, program: &str, input: &[u8], expected: &[u8]) -> Result<()> {
    let ctx = (program == programs::TC_DECAP).then(|| skb_ctx(TEST_RUN_IFINDEX));
    let (action, out) = run(f, program, input, ctx.as_deref(), VNI, |c| {
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
        hex(expected)
    );
    Ok(())
}

/// `frame` (Ethernet, IPv4 with no options) with `options` inserted into
/// its IPv4 header: IHL, total length and header checksum follow.
fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let ip = ETH_HDR_LEN;
    let mut out = frame[..ip + IPV4_HDR_LEN].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[ip + IPV4_HDR_LEN..]);
    out[ip] = 0x40 | ((IPV4_HDR_LEN + options.len()) / 4) as u8;
    let total = u16::from_be_bytes([out[ip + 2], out[ip + 3]]) + options.len() as u16;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    out[ip + 10..ip + 12].fill(0);
    let sum = checksum(&out[ip..ip + IPV4_HDR_LEN + options.len()]);
    out[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    out
}

/// TC decap pulls only the headers it reads, and the outer IPv4 options
/// on top when a frame has them. A test run's frame is linear, so this
/// checks that both hooks find the VXLAN header behind the options (the
/// second pull matters for frames whose headers are in page fragments).
#[test]
fn decap_reads_past_outer_ipv4_options() -> Result<()> {
    let f = fixture("gold-decap-opts")?;
    let inner = echo(C2, C1, mac_of(C1));
    // 40 bytes of options, the most IPv4 allows: NOPs and an end of list.
    let mut options = vec![1u8; 39];
    options.push(0);
    let input = with_ipv4_options(&vxlan_from(REMOTE_VTEP, VNI, &inner), &options);
    both_hooks_deliver(&f, &input, &inner)
}

#[test]
fn tc_decap_on_the_underlay_delivers_and_refuses_clear_vxlan_of_an_encrypted_network() -> Result<()>
{
    let mut f = fixture("gold-decap-ul")?;
    // Frames arriving on the underlay itself (not the test-run device):
    // the program knows they were not decrypted without asking the device
    // map for the crypto device.
    let on_underlay = skb_ctx(f.underlay_ifindex()?);
    let input = vxlan_from(REMOTE_VTEP, VNI, &echo(C2, C1, mac_of(C1)));
    let expected = echo(C2, C1, mac_of(C1));
    let (action, out) = run(
        &f,
        programs::TC_DECAP,
        &input,
        Some(&on_underlay),
        VNI,
        |c| {
            c.rx_packets += 1;
            c.rx_bytes += expected.len() as u64;
        },
    )?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    ensure!(out == expected, "output\n{}", hex(&out));

    f.set_network_flags(network_flags::ENCRYPTED)?;
    // From a sender that is no VTEP of it too, clear VXLAN of an encrypted
    // network is refused as clear (the network is read off the fast path,
    // the VTEP entry that carries it being missing).
    let stranger = vxlan_from(Ipv4Addr::new(192, 0, 2, 66), VNI, &echo(C2, C1, mac_of(C1)));
    for (frame, from) in [(&input, "a VTEP"), (&stranger, "a stranger")] {
        let (action, _) = run(
            &f,
            programs::TC_DECAP,
            frame,
            Some(&on_underlay),
            VNI,
            |c| c.drops[DropReason::Unencrypted as usize] += 1,
        )?;
        ensure!(
            action == TC_ACT_SHOT,
            "clear VXLAN of an encrypted network from {from}: action {action}"
        );
    }
    Ok(())
}

/// Writes `endpoint` for `addr` straight into the pinned map, as no agent
/// would: without a new epoch.
fn write_endpoint_behind_the_agents_back(
    f: &Fixture,
    addr: Ipv4Addr,
    endpoint: Endpoint,
) -> Result<()> {
    let data = MapData::from_pin(f.pin_dir().join(names::ENDPOINTS))?;
    let mut map: HashMap<_, VniAddr, Endpoint> = HashMap::try_from(Map::HashMap(data))?;
    let key = VniAddr {
        vni: VNI,
        addr: addr.octets(),
    };
    map.insert(key, endpoint, 0).context("write OVL_ENDPOINTS")
}

/// Writes (adds or replaces) `endpoint` for `addr` as the agent does: a
/// sync of the network's endpoints, which ends the maps' epoch.
fn write_endpoint_as_the_agent(f: &mut Fixture, addr: Ipv4Addr, endpoint: Endpoint) -> Result<()> {
    let mut endpoints: BTreeMap<[u8; 4], Endpoint> = datapath::read_endpoints(f.pin_dir())?
        .into_iter()
        .filter(|(k, _)| k.vni == VNI)
        .map(|(k, e)| (k.addr, e))
        .collect();
    endpoints.insert(addr.octets(), endpoint);
    f.datapath.sync_network_endpoints(VNI, endpoints)?;
    Ok(())
}

/// Two container addresses (from 198.18.64.1 on) whose flows `slot` puts
/// in one slot of a flow cache.
fn sharing_a_slot(slot: impl Fn([u8; 4]) -> u32) -> Result<[Ipv4Addr; 2]> {
    let mut first_in = BTreeMap::new();
    for i in 1..=2 * flow_cache::SLOTS {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i);
        if let Some(other) = first_in.insert(slot(addr.octets()), addr) {
            return Ok([other, addr]);
        }
    }
    anyhow::bail!("no two addresses share a slot")
}

/// Flows that share a slot of a flow cache take turns in it: each frame
/// goes to its own flow's endpoint, never to the one the slot held.
#[test]
fn flows_sharing_a_cache_slot_each_reach_their_own_endpoint() -> Result<()> {
    let mut f = fixture("gold-flow-slot")?;
    testbed::stay_on_one_cpu()?;
    let remote = sharing_a_slot(|addr| flow_cache::egress_slot(TEST_RUN_IFINDEX, addr))?;
    let local = sharing_a_slot(|addr| flow_cache::decap_slot(VNI, REMOTE_VTEP.octets(), addr))?;
    let endpoint = |addr, ifindex, vtep: Ipv4Addr| Endpoint {
        mac: mac_of(addr),
        _pad: [0; 2],
        ifindex,
        vtep: vtep.octets(),
    };
    for addr in remote {
        write_endpoint_as_the_agent(&mut f, addr, endpoint(addr, 0, REMOTE_VTEP))?;
    }
    for addr in local {
        write_endpoint_as_the_agent(
            &mut f,
            addr,
            endpoint(addr, TEST_RUN_IFINDEX, Ipv4Addr::UNSPECIFIED),
        )?;
    }
    // Frames addressed to no container's MAC: encapsulation and
    // decapsulation write the endpoint's.
    let unknown_mac = [0x02, 0x42, 0, 0, 0, 0x77];
    for round in 0..3 {
        for addr in remote {
            let out = encap(&f, &echo(C1, addr, unknown_mac))?;
            ensure!(
                out[50..56] == mac_of(addr),
                "round {round}: the frame to {addr} was sent to {}",
                hex(&out[50..56])
            );
        }
    }
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        for _ in 0..3 {
            for addr in local {
                let input = vxlan_from(REMOTE_VTEP, VNI, &echo(C2, addr, unknown_mac));
                delivers(&f, program, &input, &echo(C2, addr, mac_of(addr)))?;
            }
        }
    }
    Ok(())
}

/// Decap decides a flow's delivery once per CPU and epoch, and serves the
/// frames after it from its cache: shown by a change written behind the
/// agent's back, which the cache does not see. Every change the agent
/// makes to the maps it copies from (endpoint, VTEP, network) is followed
/// by the very next frame.
#[test]
fn decap_serves_a_flow_from_its_cache_until_the_agent_changes_a_map() -> Result<()> {
    let mut f = fixture("gold-flow-cache")?;
    testbed::stay_on_one_cpu()?;
    let input = vxlan_from(REMOTE_VTEP, VNI, &echo(C2, C1, mac_of(C1)));
    let delivered_to =
        |f: &Fixture, program: &str, mac| delivers(f, program, &input, &echo(C2, C1, mac));
    let local = |mac| Endpoint {
        mac,
        _pad: [0; 2],
        ifindex: TEST_RUN_IFINDEX,
        vtep: [0; 4],
    };
    let (behind, by_agent) = ([0x02, 0x42, 0, 0, 0, 0xbb], [0x02, 0x42, 0, 0, 0, 0xaa]);
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        // The first frame goes the whole way and is cached...
        delivered_to(&f, program, mac_of(C1))?;
        // ...so a change no agent made is not seen by the next one.
        write_endpoint_behind_the_agents_back(&f, C1, local(behind))?;
        delivered_to(&f, program, mac_of(C1))?;
        // The agent's writes of the endpoint are followed at once.
        for mac in [by_agent, mac_of(C1)] {
            write_endpoint_as_the_agent(&mut f, C1, local(mac))?;
            delivered_to(&f, program, mac)?;
        }
    }
    // (A network turned encrypted is followed at once too:
    // `tc_decap_on_the_underlay_delivers_and_refuses_clear_vxlan_of_an_encrypted_network`
    // delivers a frame, caching it, before it turns the network encrypted.)

    // The sender is no longer a VTEP of the network: refused at once.
    f.datapath.sync_vteps(&BTreeMap::new())?;
    let (action, _) = run(&f, programs::XDP_DECAP, &input, None, VNI, |c| {
        c.drops[DropReason::UnknownVtep as usize] += 1
    })?;
    ensure!(
        action == XDP_DROP,
        "VXLAN from a VTEP taken out of the network: action {action}"
    );
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

/// A super-packet dropped at TC counts as the packets it stands for, as
/// the transmit counters do: decapsulation's (a GRO-merged frame from an
/// unknown VTEP) and container egress's (to no endpoint).
#[test]
fn tc_drops_count_a_super_packet_as_its_segments() -> Result<()> {
    let f = fixture("gold-gso-drops")?;
    let input = vxlan_from(Ipv4Addr::new(192, 0, 2, 66), VNI, &echo(C2, C1, mac_of(C1)));
    let ctx = skb_ctx_gso(TEST_RUN_IFINDEX, 3, 1400);
    let (action, _) = run(&f, programs::TC_DECAP, &input, Some(&ctx), VNI, |c| {
        c.drops[DropReason::UnknownVtep as usize] += 3
    })?;
    ensure!(action == TC_ACT_SHOT, "decap: action {action}");
    let unknown = echo(C1, Ipv4Addr::new(198, 18, 0, 99), mac_of(C2));
    let ctx = skb_ctx_gso(TEST_RUN_IFINDEX, 4, 1400);
    let (action, _) = run(&f, programs::TC_EGRESS, &unknown, Some(&ctx), VNI, |c| {
        c.drops[DropReason::NoEndpoint as usize] += 4
    })?;
    ensure!(action == TC_ACT_SHOT, "egress: action {action}");
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
        (
            "inner broadcast (a kernel VTEP flooding)",
            vxlan_from(
                REMOTE_VTEP,
                VNI,
                &echo(C2, Ipv4Addr::new(198, 18, 0, 255), [0xff; 6]),
            ),
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

/// `frame` with the IPv4 header at `ip` (no options) rewritten by `edit`,
/// its checksum made valid again.
fn with_ipv4_header(frame: &[u8], ip: usize, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut out = frame.to_vec();
    edit(&mut out[ip..ip + IPV4_HDR_LEN]);
    out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let check = checksum(&out[ip..ip + IPV4_HDR_LEN]);
    out[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    out
}

/// Where the inner IPv4 header of a frame from `vxlan_from` starts.
const INNER_IP: usize = 50 + ETH_HDR_LEN;

/// VXLAN from the remote VTEP with outer TOS `outer_tos` around the echo
/// from C2 to C1 with inner TOS `inner_tos`; the echo as delivered.
fn ecn_case(outer_tos: u8, inner_tos: u8) -> (Vec<u8>, Vec<u8>) {
    let inner = with_ipv4_header(&echo(C2, C1, mac_of(C1)), ETH_HDR_LEN, |ip| {
        ip[1] = inner_tos
    });
    let input = with_ipv4_header(&vxlan_from(REMOTE_VTEP, VNI, &inner), ETH_HDR_LEN, |ip| {
        ip[1] = outer_tos
    });
    (input, inner)
}

/// Both decap hooks drop `input`, counted once on `vni` as `reason`.
fn both_hooks_drop(
    f: &Fixture,
    what: &str,
    input: &[u8],
    vni: u32,
    reason: DropReason,
) -> Result<()> {
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        let ctx = (program == programs::TC_DECAP).then(|| skb_ctx(TEST_RUN_IFINDEX));
        let (action, _) = run(f, program, input, ctx.as_deref(), vni, |c| {
            c.drops[reason as usize] += 1
        })
        .with_context(|| format!("{what}, {program}"))?;
        let want = if program == programs::XDP_DECAP {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        };
        ensure!(action == want, "{what}, {program}: action {action}");
    }
    Ok(())
}

/// The ECN code points of the IPv4 TOS byte (RFC 3168 §5).
const NOT_ECT: u8 = 0b00;
const ECT1: u8 = 0b01;
const ECT0: u8 = 0b10;
const CE: u8 = 0b11;

#[test]
fn decap_carries_the_outer_congestion_mark_onto_the_inner_packet_per_rfc6040() -> Result<()> {
    let f = fixture("gold-ecn")?;
    // Unmarked: the inner packet as it was (and its flow now cached).
    for (outer, inner) in [(ECT0, ECT0), (NOT_ECT, NOT_ECT), (0xb8 | ECT0, 0xb8 | ECT0)] {
        let (input, expected) = ecn_case(outer, inner);
        both_hooks_deliver(&f, &input, &expected)
            .with_context(|| format!("outer {outer:#04x}, inner {inner:#04x}"))?;
    }
    // Marked on the way: CE on the inner packet, DSCP kept, checksum valid.
    for inner in [ECT0, ECT1, CE, 0xb8 | ECT0] {
        let (input, _) = ecn_case(0xb8 | CE, inner);
        let (_, expected) = ecn_case(0, inner | CE);
        ensure!(checksum(&expected[ETH_HDR_LEN..ETH_HDR_LEN + IPV4_HDR_LEN]) == 0);
        both_hooks_deliver(&f, &input, &expected)
            .with_context(|| format!("CE over inner {inner:#04x}"))?;
        ensure!(
            checksum(&input[INNER_IP..INNER_IP + IPV4_HDR_LEN]) == 0,
            "the test's input changed"
        );
    }
    Ok(())
}

#[test]
fn decap_drops_ce_over_not_ect_as_congestion_not_malformed() -> Result<()> {
    let mut f = fixture("gold-ecn-drop")?;
    // CE over a packet whose sender does not do ECN: dropped (RFC 6040
    // §4.2), as its sender would never hear of the congestion. Counted
    // once as `congestion` and nothing else (`run` compares every
    // counter): not `malformed`, which sends operators after senders.
    let (input, _) = ecn_case(0xb8 | CE, 0xb8 | NOT_ECT);
    both_hooks_drop(&f, "CE over Not-ECT", &input, VNI, DropReason::Congestion)?;
    // An ECN-capable packet under the same mark is delivered, marked.
    let (marked, _) = ecn_case(CE, ECT0);
    let (_, expected) = ecn_case(0, ECT0 | CE);
    both_hooks_deliver(&f, &marked, &expected)?;

    // Decrypted VXLAN of an encrypted network, written to the crypto
    // device, runs through the same decap: the same reason there.
    f.set_network_flags(network_flags::ENCRYPTED)?;
    let crypto = skb_ctx(f.add_crypto_device()?);
    let (action, _) = run(&f, programs::TC_DECAP, &input, Some(&crypto), VNI, |c| {
        c.drops[DropReason::Congestion as usize] += 1
    })
    .context("CE over Not-ECT from the crypto device")?;
    ensure!(
        action == TC_ACT_SHOT,
        "from the crypto device: action {action}"
    );
    let (action, out) = run(&f, programs::TC_DECAP, &marked, Some(&crypto), VNI, |c| {
        c.rx_packets += 1;
        c.rx_bytes += expected.len() as u64;
    })
    .context("CE over ECT(0) from the crypto device")?;
    ensure!(
        action == TC_ACT_REDIRECT && out == expected,
        "CE over ECT(0) from the crypto device: action {action}, output\n{}",
        hex(&out)
    );
    Ok(())
}

#[test]
fn decap_drops_vxlan_whose_lengths_disagree() -> Result<()> {
    let f = fixture("gold-lengths")?;
    let inner = echo(C2, C1, mac_of(C1));
    let good = vxlan_from(REMOTE_VTEP, VNI, &inner);
    let outer_len = |frame: &[u8]| u16::from_be_bytes([frame[16], frame[17]]);

    // Two datagrams that UDP GRO on the underlay merged: the outer lengths
    // cover both, the first inner packet says its own length.
    let mut merged = good.clone();
    merged.extend_from_slice(&good[42..]);
    let total = (merged.len() - ETH_HDR_LEN) as u16;
    let mut merged = with_ipv4_header(&merged, ETH_HDR_LEN, |ip| {
        ip[2..4].copy_from_slice(&total.to_be_bytes())
    });
    merged[38..40].copy_from_slice(&(total - IPV4_HDR_LEN as u16).to_be_bytes());
    both_hooks_drop(&f, "a UDP GRO batch", &merged, VNI, DropReason::Malformed)?;

    // An inner packet longer than what carries it.
    let long_inner = with_ipv4_header(&good, INNER_IP, |ip| {
        let len = u16::from_be_bytes([ip[2], ip[3]]) + 1;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
    });
    both_hooks_drop(
        &f,
        "inner longer than its room",
        &long_inner,
        VNI,
        DropReason::Malformed,
    )?;

    // Outer headers that disagree with each other or with the frame: no
    // network is read from them.
    let mut udp_len = good.clone();
    udp_len[38..40].copy_from_slice(&(outer_len(&good) - 20 + 4).to_be_bytes());
    both_hooks_drop(
        &f,
        "UDP length",
        &udp_len,
        UNATTRIBUTED_VNI,
        DropReason::Malformed,
    )?;
    let cut = with_ipv4_header(&good, ETH_HDR_LEN, |ip| {
        let len = u16::from_be_bytes([ip[2], ip[3]]) + 8;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
    });
    let mut cut = cut;
    let udp_len = outer_len(&cut) - IPV4_HDR_LEN as u16;
    cut[38..40].copy_from_slice(&udp_len.to_be_bytes());
    both_hooks_drop(
        &f,
        "outer length beyond the frame",
        &cut,
        UNATTRIBUTED_VNI,
        DropReason::Malformed,
    )?;

    // A short inner frame padded to Ethernet's 60 bytes by its sender (a
    // hardware VTEP) is whole: delivered, padding and all.
    let short = eth(
        mac_of(C1),
        mac_of(C2),
        ETH_P_IP,
        &ipv4(C2, C1, IPPROTO_ICMP, &icmp_echo(7, 1, 0)),
    );
    let mut padded = short.clone();
    padded.resize(60, 0);
    ensure!(padded.len() - short.len() == 18);
    both_hooks_deliver(&f, &vxlan_from(REMOTE_VTEP, VNI, &padded), &padded)?;
    // And the unchanged frame still goes through.
    both_hooks_deliver(&f, &good, &inner)
}

/// An inner IPv4 header the container's stack would refuse first thing
/// (`ip_rcv_core`) is malformed here, counted on its network, rather than
/// counted delivered and lost in the container; also once the flow's
/// deliveries are cached.
#[test]
fn decap_drops_inner_ipv4_headers_the_container_would_refuse() -> Result<()> {
    let f = fixture("gold-inner-hdr")?;
    let good = vxlan_from(REMOTE_VTEP, VNI, &echo(C2, C1, mac_of(C1)));
    both_hooks_deliver(&f, &good, &echo(C2, C1, mac_of(C1)))?;
    let edited = |edit: fn(&mut [u8])| with_ipv4_header(&good, INNER_IP, edit);
    // A bare 20-byte header whose total length says 10 (padded to fit).
    let short_total = {
        let header_only = eth(
            mac_of(C1),
            mac_of(C2),
            ETH_P_IP,
            &ipv4(C2, C1, IPPROTO_ICMP, &[]),
        );
        let header_only = with_ipv4_header(&header_only, ETH_HDR_LEN, |ip| {
            ip[2..4].copy_from_slice(&10u16.to_be_bytes())
        });
        vxlan_from(REMOTE_VTEP, VNI, &header_only)
    };
    for (what, input) in [
        ("IHL 4", edited(|ip| ip[0] = 0x44)),
        ("version 6 in an IPv4 frame", edited(|ip| ip[0] = 0x65)),
        ("total length below the header's", short_total),
    ] {
        both_hooks_drop(&f, what, &input, VNI, DropReason::Malformed)?;
    }
    both_hooks_deliver(&f, &good, &echo(C2, C1, mac_of(C1)))
}

#[test]
fn decap_refuses_frames_beyond_the_network_mtu_instead_of_counting_them_delivered() -> Result<()> {
    let f = fixture("gold-decap-big")?;
    // A 1451-byte inner packet on a network with MTU 1450: what generic XDP
    // sees of a GRO super-packet, or a sender ignoring its MTU. The veth
    // would refuse it after the fact.
    let big = eth(
        mac_of(C1),
        mac_of(C2),
        ETH_P_IP,
        &ipv4(C2, C1, IPPROTO_ICMP, &icmp_echo(7, 1, 1451 - 28)),
    );
    let input = vxlan_from(REMOTE_VTEP, VNI, &big);
    both_hooks_drop(
        &f,
        "one byte beyond the MTU",
        &input,
        VNI,
        DropReason::TooBig,
    )?;
    // At the MTU: delivered.
    let full = eth(
        mac_of(C1),
        mac_of(C2),
        ETH_P_IP,
        &ipv4(C2, C1, IPPROTO_ICMP, &icmp_echo(7, 1, 1450 - 28)),
    );
    both_hooks_deliver(&f, &vxlan_from(REMOTE_VTEP, VNI, &full), &full)
}

#[test]
fn decap_refuses_a_first_fragment_of_vxlan_and_passes_later_ones() -> Result<()> {
    let f = fixture("gold-frag")?;
    let good = vxlan_from(REMOTE_VTEP, VNI, &echo(C2, C1, mac_of(C1)));
    // More fragments, offset 0: the VXLAN header is in it, the rest is not.
    let first = with_ipv4_header(&good, ETH_HDR_LEN, |ip| {
        ip[6..8].copy_from_slice(&0x2000u16.to_be_bytes())
    });
    both_hooks_drop(
        &f,
        "first fragment",
        &first,
        UNATTRIBUTED_VNI,
        DropReason::Unsupported,
    )?;
    // A later fragment has no UDP header to tell: the host's.
    let later = with_ipv4_header(&good, ETH_HDR_LEN, |ip| {
        ip[6..8].copy_from_slice(&0x00b9u16.to_be_bytes())
    });
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        let ctx = (program == programs::TC_DECAP).then(|| skb_ctx(TEST_RUN_IFINDEX));
        let before = datapath::read_global(f.pin_dir())?;
        let (action, _) = run(&f, program, &later, ctx.as_deref(), VNI, |_| {})?;
        let want = if program == programs::XDP_DECAP {
            XDP_PASS
        } else {
            TC_ACT_OK
        };
        ensure!(action == want, "later fragment, {program}: action {action}");
        let after = datapath::read_global(f.pin_dir())?;
        ensure!(
            after.passed == before.passed + 1,
            "later fragment, {program}: passed {} -> {}",
            before.passed,
            after.passed
        );
    }
    Ok(())
}

/// A UDP datagram from a peer VTEP to this one that is not VXLAN (DNS):
/// the host's, passed untouched.
fn other_udp_to_this_vtep() -> Vec<u8> {
    eth(
        ARRIVAL_MAC,
        GATEWAY_MAC,
        ETH_P_IP,
        &ipv4(
            REMOTE_VTEP,
            LOCAL_VTEP,
            IPPROTO_UDP,
            &udp(5000, 53, &[0; 20]),
        ),
    )
}

#[test]
fn decap_passes_everything_that_is_not_ovls_vxlan_untouched() -> Result<()> {
    let f = fixture("gold-pass")?;
    let other_udp = other_udp_to_this_vtep();
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

/// An ARP probe (RFC 5227: sender address 0.0.0.0, as `arping -D` and
/// address conflict detection send before using an address) claims no
/// address and poisons no cache: it is no spoofing. One for another
/// endpoint's address is answered, as its holder would (a conflict); one
/// for the container's own address has no one to answer it.
#[test]
fn egress_answers_arp_probes_for_taken_addresses_and_counts_none_as_spoofed() -> Result<()> {
    let f = fixture("gold-arp-probe")?;
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let (action, out) = egress(&f, &arp_request(mac_of(C1), unspecified, C2), |c| {
        c.arp_replies += 1
    })?;
    ensure!(action == TC_ACT_REDIRECT, "probe for C2: action {action}");
    let want = arp_reply(mac_of(C2), C2, mac_of(C1), unspecified);
    ensure!(
        out == want,
        "probe for C2: reply\n{}\nwant\n{}",
        hex(&out),
        hex(&want)
    );
    for (what, probe, reason) in [
        (
            "probe for its own address",
            arp_request(mac_of(C1), unspecified, C1),
            DropReason::Unsupported,
        ),
        (
            "probe for a free address",
            arp_request(mac_of(C1), unspecified, Ipv4Addr::new(198, 18, 0, 200)),
            DropReason::NoEndpoint,
        ),
        (
            "probe with another sender MAC",
            arp_request(mac_of(C3), unspecified, C2),
            DropReason::SpoofedSource,
        ),
    ] {
        egress_drops(&f, what, &probe, reason)?;
    }
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
fn egress_of_an_encrypted_network_never_leaves_in_clear_without_a_crypto_device() -> Result<()> {
    let mut f = fixture("gold-encap-enc")?;
    f.set_network_flags(network_flags::ENCRYPTED)?;
    // The interface entry says the network is encrypted; the fixture has
    // no crypto device (no agent): fail closed.
    let inner = echo(C1, C2, mac_of(C2));
    let (action, _) = egress(&f, &inner, |c| c.drops[DropReason::NoKey as usize] += 1)?;
    ensure!(
        action == TC_ACT_SHOT,
        "encrypted, no device: action {action}"
    );
    // Local switching is not encryption's business.
    let (action, _) = egress(&f, &echo(C1, C3, mac_of(C3)), |c| c.local_packets += 1)?;
    ensure!(
        action == TC_ACT_REDIRECT,
        "encrypted, local: action {action}"
    );
    // Back to clear: encapsulated again.
    f.set_network_flags(0)?;
    let (action, out) = egress(&f, &inner, |c| {
        c.tx_packets += 1;
        c.tx_bytes += inner.len() as u64;
    })?;
    ensure!(action == TC_ACT_REDIRECT, "clear again: action {action}");
    ensure!(out[50..] == inner[..], "inner frame changed");
    Ok(())
}

#[test]
fn egress_of_an_encrypted_network_goes_to_the_crypto_device_only_for_a_keyed_vtep() -> Result<()> {
    let mut f = fixture("gold-encap-key")?;
    f.set_network_flags(network_flags::ENCRYPTED)?;
    f.add_crypto_device()?;
    let inner = echo(C1, C2, mac_of(C2));
    // The device is up, but the VTEP's node has published no key yet:
    // dropped as `no_key`, neither sent in clear nor to the device.
    egress_drops(&f, "encrypted, VTEP not keyed", &inner, DropReason::NoKey)?;
    ensure!(
        cached_hop(&f)?.is_none(),
        "the FIB was asked for an unkeyed VTEP"
    );

    // Keyed: the VXLAN packet goes to the crypto device (which takes any
    // MAC, so none is resolved), not to the underlay's next hop.
    f.set_remote_vtep_flags(vtep_flags::ALLOWED | vtep_flags::KEYED)?;
    let (action, out) = egress(&f, &inner, |c| {
        c.tx_packets += 1;
        c.tx_bytes += inner.len() as u64;
    })?;
    ensure!(
        action == TC_ACT_REDIRECT,
        "encrypted, keyed: action {action}"
    );
    ensure!(
        out[0..12] == [0; 12] && out[12..14] == [0x08, 0x00],
        "outer eth of a frame for the crypto device\n{}",
        hex(&out[..14])
    );
    ensure!(
        out[26..30] == LOCAL_VTEP.octets() && out[30..34] == REMOTE_VTEP.octets(),
        "outer ip addrs\n{}",
        hex(&out[14..34])
    );
    ensure!(
        out[42..50] == vxlan_hdr(VNI)[..],
        "vxlan\n{}",
        hex(&out[42..50])
    );
    ensure!(out[50..] == inner[..], "inner frame changed");
    ensure!(
        cached_hop(&f)?.is_none(),
        "the FIB was asked for a frame the crypto device takes"
    );
    Ok(())
}

#[test]
fn egress_drops_frames_for_a_vtep_the_underlay_has_no_route_to() -> Result<()> {
    let mut f = fixture("gold-encap-noroute")?;
    // The fixture's underlay routes 192.0.2.0/24 and 198.51.100.0/24 only.
    let unroutable_vtep = Ipv4Addr::new(203, 0, 113, 50);
    let far = Ipv4Addr::new(198, 18, 0, 9);
    write_endpoint_as_the_agent(
        &mut f,
        far,
        Endpoint {
            mac: mac_of(far),
            _pad: [0; 2],
            ifindex: 0,
            vtep: unroutable_vtep.octets(),
        },
    )?;
    let inner = echo(C1, far, mac_of(far));
    for attempt in ["first frame", "second frame"] {
        egress_drops(&f, attempt, &inner, DropReason::NoRoute)?;
    }
    ensure!(
        datapath::read_next_hops(f.pin_dir())?.is_empty(),
        "a failed FIB lookup left a next hop"
    );
    // The VTEP that has a route is still reached.
    let (action, _) = egress(&f, &echo(C1, C2, mac_of(C2)), |c| {
        c.tx_packets += 1;
        c.tx_bytes += inner.len() as u64;
    })?;
    ensure!(action == TC_ACT_REDIRECT, "routable VTEP: action {action}");
    Ok(())
}

#[test]
fn egress_drops_what_it_cannot_switch_by_reason() -> Result<()> {
    let f = fixture("gold-egress-drops")?;
    let ipv6 = eth(mac_of(C2), mac_of(C1), 0x86dd, &[0x60; 40]);
    let unknown = echo(C1, Ipv4Addr::new(198, 18, 0, 99), mac_of(C2));
    let broadcast = echo(C1, Ipv4Addr::new(198, 18, 0, 255), [0xff; 6]);
    let limited_broadcast = echo(C1, Ipv4Addr::BROADCAST, [0xff; 6]);
    let mdns = eth(
        [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb],
        mac_of(C1),
        ETH_P_IP,
        &ipv4(
            C1,
            Ipv4Addr::new(224, 0, 0, 251),
            IPPROTO_UDP,
            &udp(5353, 5353, &[0; 12]),
        ),
    );
    let too_big = without_df(&eth(
        mac_of(C2),
        mac_of(C1),
        ETH_P_IP,
        &ipv4(C1, C2, IPPROTO_ICMP, &icmp_echo(7, 1, 1460)),
    ));
    // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header, so
    // the truncated case is an ARP request cut short.
    let runt = arp_request(mac_of(C1), C1, C2)[..24].to_vec();
    // IPv4 whose frame does not hold the packet its header says: the stack
    // it reaches (the container's, or the remote VTEP's decap) drops it.
    let cut = echo(C1, C2, mac_of(C2))[..60].to_vec();
    let total_below_header = with_ipv4_header(&echo(C1, C3, mac_of(C3)), ETH_HDR_LEN, |ip| {
        ip[2..4].copy_from_slice(&19u16.to_be_bytes())
    });
    let cases = [
        ("IPv6", ipv6, DropReason::Unsupported),
        ("unknown destination", unknown, DropReason::NoEndpoint),
        // ovl floods nothing: broadcast and multicast are traffic it does
        // not carry, not a peer gone missing.
        ("subnet broadcast", broadcast, DropReason::Unsupported),
        (
            "limited broadcast",
            limited_broadcast,
            DropReason::Unsupported,
        ),
        ("mDNS multicast", mdns, DropReason::Unsupported),
        (
            "1488-byte packet without DF on a 1500 underlay",
            too_big,
            DropReason::TooBig,
        ),
        ("truncated ARP", runt, DropReason::Malformed),
        ("IPv4 cut short", cut, DropReason::Malformed),
        (
            "IPv4 total length below its header's",
            total_below_header,
            DropReason::Malformed,
        ),
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

/// `frame` (Ethernet, IPv4 with no options) with DF cleared.
fn without_df(frame: &[u8]) -> Vec<u8> {
    with_ipv4_header(frame, ETH_HDR_LEN, |ip| ip[6] &= !0x40)
}

/// The egress program answers `input` (from C1) with ICMP fragmentation
/// needed from C1's gateway carrying `mtu`, counted once as `path_mtu`.
fn answers_frag_needed(f: &Fixture, what: &str, input: &[u8], mtu: u16) -> Result<()> {
    let (action, out) = egress(f, input, |c| c.drops[DropReason::PathMtu as usize] += 1)
        .with_context(|| what.to_owned())?;
    ensure!(action == TC_ACT_REDIRECT, "{what}: action {action}");
    let [hi, lo] = mtu.to_be_bytes();
    let want = icmp_error(GATEWAY, C1, [3, 4], [0, 0, hi, lo], input);
    ensure!(
        out == want,
        "{what}: frag needed\n{}\nwant\n{}",
        hex(&out),
        hex(&want)
    );
    Ok(())
}

/// A DF packet that would not fit the underlay once encapsulated is no
/// container ignoring its MTU only: the underlay's MTU can be lowered under
/// a running network whose containers keep theirs. RFC 1191 has the hop
/// that cannot forward it tell the sender the MTU that fits; a silent drop
/// would be a black hole for the sender's TCP.
#[test]
fn egress_answers_a_df_packet_too_big_for_the_underlay_with_frag_needed() -> Result<()> {
    let mut f = fixture("gold-ul-mtu")?;
    // 1488 bytes of IPv4 are 1538 with VXLAN, on a 1500 underlay: 1450 fit.
    let big = echo_ttl(C1, C2, mac_of(C2), 64, 1488 - 28);
    answers_frag_needed(&f, "beyond a 1500 underlay", &big, 1450)?;

    // The underlay's MTU lowered to 1400 under the network: the
    // containers' 1450 no longer fits, 1350 does.
    f.set_underlay_mtu(1400)?;
    let full = echo_ttl(C1, C2, mac_of(C2), 64, 1450 - 28);
    answers_frag_needed(&f, "beyond a 1400 underlay", &full, 1350)?;
    egress_drops(
        &f,
        "beyond a 1400 underlay, without DF",
        &without_df(&full),
        DropReason::TooBig,
    )?;
    let fits = echo_ttl(C1, C2, mac_of(C2), 64, 1350 - 28);
    encap(&f, &fits)?;

    // An encrypted network's frames carry WireGuard's 60 bytes too: 1290
    // fit a 1400 underlay.
    f.set_network_flags(network_flags::ENCRYPTED)?;
    f.add_crypto_device()?;
    f.set_remote_vtep_flags(vtep_flags::ALLOWED | vtep_flags::KEYED)?;
    let sealed = echo_ttl(C1, C2, mac_of(C2), 64, 1291 - 28);
    answers_frag_needed(&f, "encrypted, beyond a 1400 underlay", &sealed, 1290)?;
    egress_drops(
        &f,
        "encrypted, beyond a 1400 underlay, without DF",
        &without_df(&sealed),
        DropReason::TooBig,
    )?;
    encap(&f, &echo_ttl(C1, C2, mac_of(C2), 64, 1290 - 28))?;
    Ok(())
}

/// An echo request from `src` to `dst` with TTL `ttl`, in a frame to `dst_mac`.
fn echo_ttl(src: Ipv4Addr, dst: Ipv4Addr, dst_mac: [u8; 6], ttl: u8, len: usize) -> Vec<u8> {
    eth(
        dst_mac,
        mac_of(src),
        ETH_P_IP,
        &ipv4_ttl(src, dst, IPPROTO_ICMP, ttl, &icmp_echo(7, 1, len)),
    )
}

/// The ICMP error (type, code, 4 bytes of rest) the gateway `from` sends
/// to container `to` about `offending` (an Ethernet frame): RFC 792 quote
/// of its IPv4 header (options and all) and 8 bytes, TOS 0xc0, TTL 64,
/// checksums valid.
fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: [u8; 2],
    rest: [u8; 4],
    offending: &[u8],
) -> Vec<u8> {
    let mut message = vec![kind[0], kind[1], 0, 0];
    message.extend_from_slice(&rest);
    let header_len = usize::from(offending[ETH_HDR_LEN] & 0x0f) * 4;
    message.extend_from_slice(&offending[ETH_HDR_LEN..ETH_HDR_LEN + header_len + 8]);
    let c = checksum(&message);
    message[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = ipv4_ttl(from, to, IPPROTO_ICMP, 64, &message);
    // ovl's errors: TOS internetwork control, no DF.
    ip[1] = 0xc0;
    ip[6] = 0;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    eth(mac_of(to), GW_MAC, ETH_P_IP, &ip)
}

/// The egress program drops `input` (`what`, for messages), counted once
/// on `VNI` as `reason`.
fn egress_drops(f: &Fixture, what: &str, input: &[u8], reason: DropReason) -> Result<()> {
    let (action, _) =
        egress(f, input, |c| c.drops[reason as usize] += 1).with_context(|| what.to_owned())?;
    ensure!(action == TC_ACT_SHOT, "{what}: action {action}");
    Ok(())
}

/// Runs the egress program on `input` as sent by the container on the
/// test-run device (C1).
fn egress(
    f: &Fixture,
    input: &[u8],
    expect: impl FnOnce(&mut VniCounters),
) -> Result<(u32, Vec<u8>)> {
    run(
        f,
        programs::TC_EGRESS,
        input,
        Some(&skb_ctx(TEST_RUN_IFINDEX)),
        VNI,
        expect,
    )
}

#[test]
fn egress_routes_to_another_subnet_rewriting_macs_and_decrementing_ttl() -> Result<()> {
    let f = fixture("gold-route")?;
    // C1 (198.18.0.2) to D1 (198.18.1.5, local) through its gateway.
    let input = echo(C1, D1, GW_MAC);
    let (action, out) = egress(&f, &input, |c| c.local_packets += 1)?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    let mut want = echo_ttl(C1, D1, mac_of(D1), 63, 56);
    want[6..12].copy_from_slice(&GW_MAC);
    ensure!(out == want, "routed\n{}\nwant\n{}", hex(&out), hex(&want));
    ensure!(checksum(&out[14..34]) == 0, "IPv4 checksum does not verify");

    // D2 is behind the remote VTEP: routed, then encapsulated.
    let input = echo(C1, D2, GW_MAC);
    let (action, out) = egress(&f, &input, |c| {
        c.tx_packets += 1;
        c.tx_bytes += input.len() as u64;
    })?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    let mut inner = echo_ttl(C1, D2, mac_of(D2), 63, 56);
    inner[6..12].copy_from_slice(&GW_MAC);
    ensure!(
        out.len() == inner.len() + 50 && out[50..] == inner[..],
        "encapsulated routed frame\n{}\nwant inner\n{}",
        hex(&out),
        hex(&inner)
    );
    ensure!(
        out[16 + 14..20 + 14] == REMOTE_VTEP.octets(),
        "outer destination"
    );
    Ok(())
}

#[test]
fn egress_answers_ttl_1_at_the_gateway_with_time_exceeded() -> Result<()> {
    let f = fixture("gold-ttl")?;
    answers_time_exceeded(&f, "TTL 1", &echo_ttl(C1, D1, GW_MAC, 1, 56))
}

/// Sends `input` (TTL 1 through the gateway) through C1's egress, which
/// must answer it with ICMP time exceeded from the gateway quoting it,
/// with a checksum that verifies, counted `ttl_exceeded`.
fn answers_time_exceeded(f: &Fixture, what: &str, input: &[u8]) -> Result<()> {
    let (action, out) = egress(f, input, |c| c.drops[DropReason::TtlExceeded as usize] += 1)
        .with_context(|| what.to_owned())?;
    ensure!(action == TC_ACT_REDIRECT, "{what}: action {action}");
    let want = icmp_error(GATEWAY, C1, [11, 0], [0; 4], input);
    ensure!(
        out == want,
        "{what}: time exceeded\n{}\nwant\n{}",
        hex(&out),
        hex(&want)
    );
    ensure!(
        checksum(&out[34..]) == 0,
        "{what}: ICMP checksum does not verify"
    );
    Ok(())
}

/// A packet with IPv4 options (`ping -R`, `traceroute` with options,
/// security labels) that the gateway cannot forward is answered as any
/// other: the quote holds its header with the options, so the sender's
/// stack finds the quoted transport header (by the quoted IHL) and the
/// socket it belongs to. Silently dropped, it would be a black hole.
#[test]
fn the_gateway_answers_packets_with_ipv4_options_quoting_them_whole() -> Result<()> {
    let f = fixture("gold-icmp-opts")?;
    // Record route with room for two addresses, then NOP and end of list:
    // 12 bytes of options, IHL 8.
    let options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let ttl_1 = with_ipv4_options(&echo_ttl(C1, D1, GW_MAC, 1, 56), &options);
    answers_time_exceeded(&f, "TTL 1 with options", &ttl_1)?;
    // Too big for the underlay, with DF: 1476 bytes of IPv4 with its 12 of
    // options, 1526 once encapsulated.
    let big = with_ipv4_options(&echo_ttl(C1, C2, mac_of(C2), 64, 1464 - 28), &options);
    answers_frag_needed(&f, "with options, beyond a 1500 underlay", &big, 1450)?;
    // The largest header: 40 bytes of options (NOPs, end of list).
    let mut nops = vec![1u8; 39];
    nops.push(0);
    let longest = with_ipv4_options(&echo_ttl(C1, D1, GW_MAC, 1, 56), &nops);
    let (_, out) = egress(&f, &longest, |c| {
        c.drops[DropReason::TtlExceeded as usize] += 1
    })?;
    let want = icmp_error(GATEWAY, C1, [11, 0], [0; 4], &longest);
    ensure!(
        out == want,
        "time exceeded, IHL 15\n{}\nwant\n{}",
        hex(&out),
        hex(&want)
    );
    Ok(())
}

#[test]
fn the_gateway_sends_no_icmp_error_about_errors_broadcasts_or_later_fragments() -> Result<()> {
    let f = fixture("gold-ttl-quiet")?;
    // TTL 1 through the gateway, each of which RFC 1812 §4.3.2.7 forbids
    // answering: dropped as ttl_exceeded, and nothing sent back.
    let to_broadcast = echo_ttl(C1, Ipv4Addr::BROADCAST, GW_MAC, 1, 56);
    let to_multicast = echo_ttl(C1, Ipv4Addr::new(239, 1, 2, 3), GW_MAC, 1, 56);
    let later_fragment = with_ipv4_header(&echo_ttl(C1, D1, GW_MAC, 1, 56), ETH_HDR_LEN, |ip| {
        ip[6..8].copy_from_slice(&0x00b9u16.to_be_bytes())
    });
    let an_error = {
        // A time exceeded of C1's own, quoting something.
        let mut message = vec![11, 0, 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(&ipv4(D1, C1, IPPROTO_UDP, &[0; 8]));
        let check = checksum(&message);
        message[2..4].copy_from_slice(&check.to_be_bytes());
        eth(
            GW_MAC,
            mac_of(C1),
            ETH_P_IP,
            &ipv4_ttl(C1, D1, IPPROTO_ICMP, 1, &message),
        )
    };
    for (what, input) in [
        ("to 255.255.255.255", to_broadcast),
        ("to a multicast group", to_multicast),
        ("a later fragment", later_fragment),
        ("an ICMP error", an_error),
    ] {
        egress_drops(&f, what, &input, DropReason::TtlExceeded)?;
    }
    Ok(())
}

#[test]
fn egress_answers_arp_and_echo_for_the_gateway() -> Result<()> {
    let f = fixture("gold-gw")?;
    let (action, out) = egress(&f, &arp_request(mac_of(C1), C1, GATEWAY), |c| {
        c.arp_replies += 1
    })?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    let want = arp_reply(GW_MAC, GATEWAY, mac_of(C1), C1);
    ensure!(out == want, "reply\n{}\nwant\n{}", hex(&out), hex(&want));

    // The other subnet's gateway answers too (routing to it is routing).
    let (_, out) = egress(&f, &arp_request(mac_of(C1), C1, OTHER_GATEWAY), |c| {
        c.arp_replies += 1
    })?;
    ensure!(out[6..12] == GW_MAC, "other gateway's MAC");

    let (action, out) = egress(&f, &echo(C1, GATEWAY, GW_MAC), |c| c.local_packets += 1)?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    let mut reply_icmp = icmp_echo(7, 1, 56);
    reply_icmp[0] = 0;
    reply_icmp[2..4].copy_from_slice(&[0, 0]);
    let c = checksum(&reply_icmp);
    reply_icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = ipv4(GATEWAY, C1, IPPROTO_ICMP, &reply_icmp);
    ip[6] = 0;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let want = eth(mac_of(C1), GW_MAC, ETH_P_IP, &ip);
    ensure!(
        out == want,
        "echo reply\n{}\nwant\n{}",
        hex(&out),
        hex(&want)
    );
    Ok(())
}

#[test]
fn egress_drops_spoofed_sources_and_counts_them() -> Result<()> {
    let f = fixture("gold-spoofed")?;
    let other_ip = echo(C3, C2, mac_of(C2)); // C1's veth, C3's address and MAC
    let mut forged_mac = echo(C1, C2, mac_of(C2));
    forged_mac[6..12].copy_from_slice(&[0x02, 0x42, 0, 0, 0, 0x66]);
    let mut ip_only = echo(C1, C2, mac_of(C2));
    ip_only[14 + 12..14 + 16].copy_from_slice(&C3.octets());
    let arp_forged_ip = arp_request(mac_of(C1), C3, C2);
    let mut arp_forged_sha = arp_request(mac_of(C1), C1, C2);
    arp_forged_sha[22..28].copy_from_slice(&mac_of(C3));
    let routed_forged = echo(C3, D1, GW_MAC);
    for (what, input) in [
        ("another container's address and MAC", other_ip),
        ("a forged MAC", forged_mac),
        ("a forged address", ip_only),
        ("ARP with another sender address", arp_forged_ip),
        ("ARP with another sender MAC", arp_forged_sha),
        ("routed with a forged address", routed_forged),
    ] {
        egress_drops(&f, what, &input, DropReason::SpoofedSource)?;
    }
    Ok(())
}

#[test]
fn egress_hands_external_destinations_to_the_host_unless_internal() -> Result<()> {
    let mut f = fixture("gold-out")?;
    let outside = Ipv4Addr::new(203, 0, 113, 1);
    let input = echo(C1, outside, GW_MAC);
    let (action, out) = egress(&f, &input, |c| c.egress_packets += 1)?;
    ensure!(action == TC_ACT_OK, "action {action}");
    ensure!(out == input, "the frame changed on its way to the host");
    // Inside a subnet but no endpoint: no way to it.
    let (action, _) = egress(&f, &echo(C1, Ipv4Addr::new(198, 18, 1, 99), GW_MAC), |c| {
        c.drops[DropReason::NoEndpoint as usize] += 1
    })?;
    ensure!(action == TC_ACT_SHOT, "action {action}");

    f.set_network_flags(network_flags::INTERNAL)?;
    let (action, _) = egress(&f, &input, |c| c.drops[DropReason::NoRoute as usize] += 1)?;
    ensure!(action == TC_ACT_SHOT, "internal: action {action}");
    // Subnets still route to each other on an internal network.
    let (action, _) = egress(&f, &echo(C1, D1, GW_MAC), |c| c.local_packets += 1)?;
    ensure!(
        action == TC_ACT_REDIRECT,
        "internal, routed: action {action}"
    );
    Ok(())
}

/// UDP from C1 through its gateway to `dst`, port `port`, carrying a
/// VXLAN header (of the test's network) and an echo between containers.
fn udp_out(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut payload = vxlan_hdr(VNI).to_vec();
    payload.extend_from_slice(&echo(C3, C2, mac_of(C2)));
    eth(
        GW_MAC,
        mac_of(C1),
        ETH_P_IP,
        &ipv4(C1, dst, IPPROTO_UDP, &udp(40000, port, &payload)),
    )
}

#[test]
fn egress_drops_vxlan_a_container_sends_out_through_its_gateway() -> Result<()> {
    let f = fixture("gold-outvx")?;
    // Another node: the host would masquerade it behind this node's VTEP.
    let node = Ipv4Addr::new(203, 0, 113, 7);
    let vxlan = udp_out(node, 4789);
    let first = with_ipv4_header(&vxlan, ETH_HDR_LEN, |ip| {
        ip[6..8].copy_from_slice(&0x2000u16.to_be_bytes())
    });
    // An IPv4 option (NOP, NOP, NOP, end) moves the port.
    let options = with_ipv4_options(&vxlan, &[1, 1, 1, 0]);
    for (what, input) in [
        ("VXLAN", vxlan),
        ("its first fragment", first),
        ("VXLAN behind IPv4 options", options),
    ] {
        egress_drops(&f, what, &input, DropReason::SpoofedSource)?;
    }
    // A header cut short of the ports is malformed.
    let mut runt = udp_out(node, 4789);
    runt.truncate(ETH_HDR_LEN + IPV4_HDR_LEN + 2);
    egress_drops(&f, "a runt", &runt, DropReason::Malformed)?;
    // Other ports, and a later fragment (its first, refused, holds the
    // port), go to the host as any egress.
    let later = with_ipv4_header(&udp_out(node, 4789), ETH_HDR_LEN, |ip| {
        ip[6..8].copy_from_slice(&0x00b9u16.to_be_bytes())
    });
    // A path MTU report quoting VXLAN would teach the node a path MTU.
    let report = |port| {
        let message = &frag_needed_report(REMOTE_VTEP, port, 1300)[ETH_HDR_LEN + IPV4_HDR_LEN..];
        eth(
            GW_MAC,
            mac_of(C1),
            ETH_P_IP,
            &ipv4(C1, node, IPPROTO_ICMP, message),
        )
    };
    egress_drops(
        &f,
        "a path MTU report",
        &report(4789),
        DropReason::SpoofedSource,
    )?;
    for (what, input) in [
        ("another port", udp_out(node, 4790)),
        ("a later fragment", later),
        ("a report about another port", report(4790)),
    ] {
        let (action, out) = egress(&f, &input, |c| c.egress_packets += 1).context(what)?;
        ensure!(action == TC_ACT_OK, "{what}: action {action}");
        ensure!(
            out == input,
            "{what}: the frame changed on its way to the host"
        );
    }
    Ok(())
}

/// An ICMP "fragmentation needed" (next-hop MTU `mtu`) from the underlay
/// router to this VTEP, quoting an encapsulated packet this VTEP sent to
/// `to_vtep` on UDP `port`.
fn frag_needed_report(to_vtep: Ipv4Addr, port: u16, mtu: u16) -> Vec<u8> {
    let sent = ipv4(
        LOCAL_VTEP,
        to_vtep,
        IPPROTO_UDP,
        &udp(51000, port, &vxlan_hdr(VNI)),
    );
    let mut quoted = sent[..28].to_vec();
    // The packet that did not fit was 1500 bytes long.
    quoted[2..4].copy_from_slice(&1500u16.to_be_bytes());
    let mut message = vec![3, 4, 0, 0, 0, 0];
    message.extend_from_slice(&mtu.to_be_bytes());
    message.extend_from_slice(&quoted);
    let c = checksum(&message);
    message[2..4].copy_from_slice(&c.to_be_bytes());
    eth(
        ARRIVAL_MAC,
        GATEWAY_MAC,
        ETH_P_IP,
        &ipv4(
            Ipv4Addr::new(192, 0, 2, 1),
            LOCAL_VTEP,
            IPPROTO_ICMP,
            &message,
        ),
    )
}

#[test]
fn decap_learns_the_path_mtu_and_encap_answers_larger_packets_with_frag_needed() -> Result<()> {
    let f = fixture("gold-pmtu")?;
    // A report about another port, or with a bogus MTU, teaches nothing.
    for (what, report) in [
        ("other port", frag_needed_report(REMOTE_VTEP, 8472, 1400)),
        (
            "MTU above the refused size",
            frag_needed_report(REMOTE_VTEP, 4789, 1600),
        ),
    ] {
        let (action, _) = run(&f, programs::XDP_DECAP, &report, None, VNI, |_| {})?;
        ensure!(action == XDP_PASS, "{what}: action {action}");
        ensure!(
            datapath::read_path_mtus(f.pin_dir())?.is_empty(),
            "{what}: a path MTU was learned"
        );
    }
    let g0 = datapath::read_global(f.pin_dir())?;
    for program in [programs::XDP_DECAP, programs::TC_DECAP] {
        let ctx = (program == programs::TC_DECAP).then(|| skb_ctx(TEST_RUN_IFINDEX));
        let report = frag_needed_report(REMOTE_VTEP, 4789, 1400);
        let (action, out) = run(&f, program, &report, ctx.as_deref(), VNI, |_| {})?;
        ensure!(
            out == report,
            "{program}: the report changed on its way to the host"
        );
        ensure!(
            action == XDP_PASS || action == testbed::action::TC_ACT_OK,
            "{program}: action {action}"
        );
    }
    let g1 = datapath::read_global(f.pin_dir())?;
    ensure!(
        g1.path_mtu_reports - g0.path_mtu_reports == 2,
        "path_mtu_reports {g0:?} -> {g1:?}"
    );
    let learned = datapath::read_path_mtus(f.pin_dir())?;
    ensure!(
        learned.len() == 1 && learned[0].0 == REMOTE_VTEP.octets() && learned[0].1.mtu == 1400,
        "learned {learned:?}"
    );

    // 1350 bytes of IPv4 fit the path (1400 with VXLAN); 1351 do not.
    let fits = echo_ttl(C1, C2, mac_of(C2), 64, 1350 - 28);
    let (action, _) = egress(&f, &fits, |c| {
        c.tx_packets += 1;
        c.tx_bytes += fits.len() as u64;
    })?;
    ensure!(action == TC_ACT_REDIRECT, "fitting packet: action {action}");
    let big = echo_ttl(C1, C2, mac_of(C2), 64, 1351 - 28);
    let (action, out) = egress(&f, &big, |c| c.drops[DropReason::PathMtu as usize] += 1)?;
    ensure!(action == TC_ACT_REDIRECT, "oversize: action {action}");
    let want = icmp_error(GATEWAY, C1, [3, 4], [0, 0, 0x05, 0x46], &big);
    ensure!(
        out == want,
        "frag needed\n{}\nwant\n{}",
        hex(&out),
        hex(&want)
    );
    // Without DF the sender asked for fragments ovl cannot make: dropped.
    let mut no_df = big.clone();
    no_df[14 + 6] = 0;
    let c = checksum(&{
        let mut h = no_df[14..34].to_vec();
        h[10..12].copy_from_slice(&[0, 0]);
        h
    });
    no_df[24..26].copy_from_slice(&c.to_be_bytes());
    let (action, _) = egress(&f, &no_df, |c| c.drops[DropReason::TooBig as usize] += 1)?;
    ensure!(action == TC_ACT_SHOT, "no DF: action {action}");
    Ok(())
}

/// Path MTU reports come from routers on the underlay. One the crypto
/// device opened came through a peer's tunnel, from no router on the way:
/// dropped as everything the device opens that is no VXLAN for here, and
/// nothing learned from it.
#[test]
fn decap_learns_no_path_mtu_from_a_report_the_crypto_device_opened() -> Result<()> {
    let mut f = fixture("gold-pmtu-crypto")?;
    let crypto = skb_ctx(f.add_crypto_device()?);
    let report = frag_needed_report(REMOTE_VTEP, 4789, 1400);
    let g0 = datapath::read_global(f.pin_dir())?;
    let (action, _) = run(
        &f,
        programs::TC_DECAP,
        &report,
        Some(&crypto),
        UNATTRIBUTED_VNI,
        |c| c.drops[DropReason::Unsupported as usize] += 1,
    )?;
    ensure!(action == TC_ACT_SHOT, "action {action}");
    let g1 = datapath::read_global(f.pin_dir())?;
    ensure!(
        g1.path_mtu_reports == g0.path_mtu_reports,
        "path_mtu_reports {g0:?} -> {g1:?}"
    );
    let learned = datapath::read_path_mtus(f.pin_dir())?;
    ensure!(learned.is_empty(), "learned {learned:?}");
    Ok(())
}

/// Encapsulates `inner` (from C1) and returns the output frame, checking
/// it was redirected and counted.
fn encap(f: &Fixture, inner: &[u8]) -> Result<Vec<u8>> {
    let (action, out) = egress(f, inner, |c| {
        c.tx_packets += 1;
        c.tx_bytes += inner.len() as u64;
    })?;
    ensure!(action == TC_ACT_REDIRECT, "action {action}");
    Ok(out)
}

/// The next-hop cache's entry for the remote VTEP, if any.
fn cached_hop(f: &Fixture) -> Result<Option<NextHop>> {
    Ok(datapath::read_next_hops(f.pin_dir())?
        .into_iter()
        .find(|(vtep, _)| *vtep == REMOTE_VTEP.octets())
        .map(|(_, hop)| hop))
}

#[test]
fn encap_caches_the_next_hop_and_sends_the_same_frame_from_the_cache() -> Result<()> {
    let f = fixture("gold-hop-cache")?;
    ensure!(
        cached_hop(&f)?.is_none(),
        "a next hop cached before any packet"
    );
    let inner = echo(C1, C2, mac_of(C2));
    let from_fib = encap(&f, &inner)?;
    let hop = cached_hop(&f)?.context("the FIB's answer was not cached")?;
    ensure!(
        hop.dmac == GATEWAY_MAC
            && hop.smac == UNDERLAY_MAC
            && hop.ifindex == f.underlay_ifindex()?
            && hop.via == next_hop_via::RESOLVED
            && hop.mtu == 1500
            && hop.learned_ns != 0,
        "cached {hop:?}"
    );
    let from_cache = encap(&f, &inner)?;
    ensure!(
        from_cache == from_fib,
        "from the cache\n{}\nfrom the FIB\n{}",
        hex(&from_cache),
        hex(&from_fib)
    );
    ensure!(
        cached_hop(&f)? == Some(hop),
        "a fresh entry was looked up again"
    );
    Ok(())
}

/// Egress looks a flow's interface, destination and next hop up once per
/// CPU and epoch and serves the frames after it from its cache (a change
/// written behind the agent's back is not seen), but checks every frame's
/// sources; every change the agent makes to the interface, the endpoint
/// or the next hops is followed by the very next frame.
#[test]
fn egress_serves_a_flow_from_its_cache_until_the_agent_changes_a_map() -> Result<()> {
    let mut f = fixture("gold-egress-cache")?;
    testbed::stay_on_one_cpu()?;
    let inner = echo(C1, C2, mac_of(C2));
    let remote = |mac| Endpoint {
        mac,
        _pad: [0; 2],
        ifindex: 0,
        vtep: REMOTE_VTEP.octets(),
    };
    // The inner destination MAC encapsulation writes: the endpoint's.
    let sent_to = |f: &Fixture| -> Result<[u8; 6]> {
        let out = encap(f, &inner)?;
        Ok(out[50..56].try_into()?)
    };
    // The first frame looks both up and caches them...
    ensure!(sent_to(&f)? == mac_of(C2), "first frame");
    // ...so a change no agent made is not seen by the next one.
    let (behind, by_agent) = ([0x02, 0x42, 0, 0, 0, 0xbb], [0x02, 0x42, 0, 0, 0, 0xaa]);
    write_endpoint_behind_the_agents_back(&f, C2, remote(behind))?;
    ensure!(sent_to(&f)? == mac_of(C2), "the cache did not serve");
    // A cached flow's frames are still checked one by one.
    let mut forged = inner.clone();
    forged[6..12].copy_from_slice(&[0x02, 0x42, 0, 0, 0, 0x66]);
    let (action, _) = egress(&f, &forged, |c| {
        c.drops[DropReason::SpoofedSource as usize] += 1
    })?;
    ensure!(
        action == TC_ACT_SHOT,
        "forged source of a cached flow: action {action}"
    );
    // The agent's writes of the endpoint are followed at once.
    for mac in [by_agent, mac_of(C2)] {
        write_endpoint_as_the_agent(&mut f, C2, remote(mac))?;
        ensure!(sent_to(&f)? == mac, "the agent's endpoint not followed");
    }
    // The next hop rides in the flow's slot too: with the next-hop cache
    // emptied behind the agent's back, the FIB is not asked again.
    let data = MapData::from_pin(f.pin_dir().join(names::NEXT_HOPS))?;
    let mut hops: HashMap<_, [u8; 4], NextHop> = HashMap::try_from(Map::LruHashMap(data))?;
    hops.remove(&REMOTE_VTEP.octets())?;
    ensure!(sent_to(&f)? == mac_of(C2), "the cache did not serve");
    ensure!(
        cached_hop(&f)?.is_none(),
        "the next hop was looked up, not served from the flow's slot"
    );
    // An agent's emptying is followed at once.
    f.datapath.clear_next_hops()?;
    ensure!(sent_to(&f)? == mac_of(C2), "after emptying");
    ensure!(cached_hop(&f)?.is_some(), "the FIB was not asked again");
    // So is the interface, taken away by the agent.
    f.datapath.sync_ifaces(&BTreeMap::new())?;
    let (action, _) = run(
        &f,
        programs::TC_EGRESS,
        &inner,
        Some(&skb_ctx(TEST_RUN_IFINDEX)),
        UNATTRIBUTED_VNI,
        |c| c.drops[DropReason::NoEndpoint as usize] += 1,
    )?;
    ensure!(
        action == TC_ACT_SHOT,
        "from an interface taken away: action {action}"
    );
    Ok(())
}

#[test]
fn encap_without_forwarding_caches_that_the_kernel_routes() -> Result<()> {
    let f = Fixture::new("gold-hop-kernel")?;
    f.set_forwarding(false)?;
    let inner = echo(C1, C2, mac_of(C2));
    let out = encap(&f, &inner)?;
    let hop = cached_hop(&f)?.context("nothing cached")?;
    ensure!(
        hop.via == next_hop_via::KERNEL_ROUTED && hop.ifindex == f.underlay_ifindex()?,
        "cached {hop:?}"
    );
    // The kernel writes the MACs as it routes the packet after the program.
    ensure!(out[0..12] == [0; 12], "outer MACs\n{}", hex(&out[..14]));
    ensure!(out[50..] == inner[..], "inner frame changed");
    let again = encap(&f, &inner)?;
    ensure!(again == out, "from the cache\n{}", hex(&again));
    Ok(())
}

/// Forwarding off: the agent's resolver upgrades the entry the program
/// made for the kernel's routing to the gateway's MACs, and the program
/// sends the next frame straight out with them; a stale agent entry
/// expires back to the kernel's routing like any other.
#[test]
fn encap_without_forwarding_sends_straight_out_once_the_agent_resolved_the_next_hop() -> Result<()>
{
    let mut f = Fixture::new("gold-hop-agent")?;
    f.set_forwarding(false)?;
    let inner = echo(C1, C2, mac_of(C2));
    let routed = encap(&f, &inner)?;
    ensure!(
        cached_hop(&f)?.is_some_and(|h| h.via == next_hop_via::KERNEL_ROUTED),
        "the program did not mark the VTEP kernel-routed: {:?}",
        cached_hop(&f)?
    );

    let underlay = ovl_userspace::netlink::Underlay {
        name: testbed::fixture::UNDERLAY_IFACE.to_owned(),
        ifindex: f.underlay_ifindex()?,
        addr: LOCAL_VTEP,
        mtu: 1500,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = runtime.block_on(async {
        let mut resolver = next_hops::Resolver::new(&underlay)?;
        resolver.refresh(&mut f.datapath).await
    })?;
    ensure!(done.written == 1, "refresh: {done:?}");
    let hop = cached_hop(&f)?.context("the refresh removed the entry")?;
    ensure!(
        hop.via == next_hop_via::AGENT_RESOLVED
            && hop.dmac == GATEWAY_MAC
            && hop.smac == UNDERLAY_MAC
            && hop.ifindex == f.underlay_ifindex()?
            && hop.mtu == 1500,
        "agent entry {hop:?}"
    );
    let direct = encap(&f, &inner)?;
    ensure!(
        direct[0..6] == GATEWAY_MAC && direct[6..12] == UNDERLAY_MAC,
        "outer MACs\n{}",
        hex(&direct[..14])
    );
    ensure!(
        direct[12..] == routed[12..],
        "only the MACs may differ from the kernel-routed frame\n{}\n{}",
        hex(&direct),
        hex(&routed)
    );
    ensure!(
        cached_hop(&f)? == Some(hop),
        "the program rewrote the entry"
    );

    // An entry nobody refreshes expires: the FIB helper is asked again,
    // refuses, and the kernel routes.
    let stale = NextHop {
        learned_ns: hop.learned_ns.saturating_sub(2 * NEXT_HOP_TTL_NS),
        ..hop
    };
    f.datapath.set_next_hop(REMOTE_VTEP.octets(), stale)?;
    let again = encap(&f, &inner)?;
    ensure!(again[0..12] == [0; 12], "outer MACs\n{}", hex(&again[..14]));
    ensure!(
        cached_hop(&f)?.is_some_and(|h| h.via == next_hop_via::KERNEL_ROUTED),
        "after expiry {:?}",
        cached_hop(&f)?
    );
    Ok(())
}

#[test]
fn encap_follows_a_changed_neighbour_mac_once_the_cache_is_emptied_or_expires() -> Result<()> {
    let mut f = fixture("gold-hop-neigh")?;
    let inner = echo(C1, C2, mac_of(C2));
    ensure!(encap(&f, &inner)?[0..6] == GATEWAY_MAC, "first frame");
    let moved = [0x02, 0, 0, 0, 0, 0x99];
    f.set_gateway_mac(moved)?;
    // The agent empties the cache when the kernel reports the change.
    ensure!(f.datapath.clear_next_hops()? == 1, "one entry cached");
    let out = encap(&f, &inner)?;
    ensure!(out[0..6] == moved, "after emptying\n{}", hex(&out[..14]));

    // An entry older than NEXT_HOP_TTL_NS is not used: the next frame asks
    // the FIB again. Aged by writing it back learned that much earlier (on
    // the kernel's coarse monotonic clock it was stamped with), not by
    // waiting it out.
    f.set_gateway_mac(GATEWAY_MAC)?;
    let hop = cached_hop(&f)?.context("nothing cached after emptying")?;
    ensure!(hop.dmac == moved, "cached {hop:?}");
    let expired = NextHop {
        learned_ns: hop.learned_ns.saturating_sub(2 * NEXT_HOP_TTL_NS),
        ..hop
    };
    f.datapath.set_next_hop(REMOTE_VTEP.octets(), expired)?;
    let out = encap(&f, &inner)?;
    ensure!(
        out[0..6] == GATEWAY_MAC,
        "after expiry\n{}",
        hex(&out[..14])
    );
    let renewed = cached_hop(&f)?.context("nothing cached after expiry")?;
    ensure!(
        renewed.dmac == GATEWAY_MAC && renewed.learned_ns > expired.learned_ns,
        "the FIB was not asked again: cached {renewed:?}"
    );
    Ok(())
}

#[test]
fn encap_asks_the_fib_for_a_packet_larger_than_the_cached_route_mtu() -> Result<()> {
    let f = fixture("gold-hop-mtu")?;
    f.set_route_mtu(1400)?;
    let small = echo_ttl(C1, C2, mac_of(C2), 64, 100);
    encap(&f, &small)?;
    let hop = cached_hop(&f)?.context("nothing cached")?;
    ensure!(hop.mtu == 1400, "cached {hop:?}");
    // 1351 bytes of IPv4 are 1401 with VXLAN: the FIB refuses it, the
    // route's MTU becomes the VTEP's path MTU, and this very packet's
    // sender is told (not only the next one's).
    let big = echo_ttl(C1, C2, mac_of(C2), 64, 1351 - 28);
    answers_frag_needed(&f, "beyond the route's MTU", &big, 1350)?;
    let learned = datapath::read_path_mtus(f.pin_dir())?;
    ensure!(
        learned.len() == 1 && learned[0].1.mtu == 1400,
        "learned {learned:?}"
    );
    // One that fits still leaves from the cache.
    let fits = echo_ttl(C1, C2, mac_of(C2), 64, 1350 - 28);
    encap(&f, &fits)?;
    Ok(())
}

#[test]
fn the_cluster_vxlan_port_is_what_encap_sends_and_decap_accepts() -> Result<()> {
    let mut f = fixture("gold-port")?;
    f.datapath.set_vxlan_port(8472)?;
    let inner = echo(C1, C2, mac_of(C2));
    let (_, out) = egress(&f, &inner, |c| {
        c.tx_packets += 1;
        c.tx_bytes += inner.len() as u64;
    })?;
    ensure!(
        out[36..38] == 8472u16.to_be_bytes(),
        "destination port\n{}",
        hex(&out[..50])
    );

    let from_c2 = echo(C2, C1, mac_of(C1));
    let on_4789 = vxlan_from(REMOTE_VTEP, VNI, &from_c2);
    let (action, out) = run(&f, programs::XDP_DECAP, &on_4789, None, VNI, |_| {})?;
    ensure!(
        action == XDP_PASS && out == on_4789,
        "4789 is not ovl's now: {action}"
    );
    let mut on_8472 = on_4789.clone();
    on_8472[36..38].copy_from_slice(&8472u16.to_be_bytes());
    let (action, _) = run(&f, programs::XDP_DECAP, &on_8472, None, VNI, |c| {
        c.rx_packets += 1;
        c.rx_bytes += from_c2.len() as u64;
    })?;
    ensure!(action == XDP_REDIRECT, "8472: action {action}");
    Ok(())
}
