// `ovl-microbench`: ovl's kernel programs alone, timed per packet with
// BPF_PROG_TEST_RUN; `ovl-bench` runs it and reads its JSON.

//! Times every kernel program on representative frames (encapsulation of a
//! 64- and a 1400-byte frame, decapsulation of the same in XDP and TC, the
//! pass-through every other underlay packet pays, same-host switching,
//! cold caches, and 64 or 1024 flows taken in turn, which time what the
//! flow caches keep of many flows) and prints one JSON array on stdout.
//!
//! BPF_PROG_TEST_RUN with `repeat` reruns the program on the packet *as the
//! previous run left it*: after one encapsulation the next run sees an
//! encapsulated frame, after one decapsulation a plain one. So each case is
//! timed as the median of many single runs (each one the real path), and
//! the repeat figure is kept only where the program leaves its input
//! unchanged, with the action the last run returned as evidence otherwise.
//!
//! Usage: `ovl-microbench [--samples N] [--repeat N]` (root; built with
//! `cargo build --release -p ovl-bench`).

// The golden tests' testbed: one fixture and one set of frame builders for
// both, so the benchmark times exactly what the tests check.
#[allow(dead_code, reason = "shared with the golden tests; each uses part")]
#[path = "../../../ovl-userspace/tests/testbed/mod.rs"]
mod testbed;

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData};
use ovl_common::maps::{names, programs};
use ovl_common::wire::{ENCAP_OVERHEAD, ETH_P_IP, IPPROTO_UDP};
use ovl_common::{Endpoint, NextHop};
use ovl_userspace::datapath;
use serde_json::{Value, json};

use crate::testbed::action::{TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_REDIRECT};
use crate::testbed::fixture::{
    Fixture, GATEWAY_MAC, LOCAL_CONTAINER, LOCAL_VTEP, NEIGHBOUR_CONTAINER, REMOTE_CONTAINER,
    REMOTE_VTEP, TEST_RUN_IFINDEX, UNDERLAY_MAC, VNI, skb_ctx,
};
use crate::testbed::frames::{
    container_mac, container_udp_frame, ethernet, ipv4, udp, vxlan_frame,
};

/// Single runs per case unless `--samples` says otherwise.
const DEFAULT_SAMPLES: usize = 20_000;
/// Runs of one BPF_PROG_TEST_RUN call in the repeat figure.
const DEFAULT_REPEAT: u32 = 100_000;

/// One timed program on one frame.
struct Case {
    name: &'static str,
    program: &'static str,
    hook: &'static str,
    /// The frames, one per flow: single runs take them in turn (one flow
    /// each when there is one).
    frames: Vec<Vec<u8>>,
    /// `__sk_buff` context for TC programs; XDP runs without one.
    ctx: Option<Vec<u8>>,
    expected_action: u32,
    /// How much longer (positive) or shorter the output frame is.
    length_change: isize,
    /// IPv4 forwarding in the fixture namespace during this case.
    forwarding: bool,
    /// Empty the next-hop cache before every run, so each one asks the FIB
    /// (the first packet to a VTEP, or one a second after the last lookup);
    /// with `cold_flow_cache`, as the agent empties it, since egress's flow
    /// cache keeps a copy.
    cold_next_hop: bool,
    /// Start a new epoch of the maps before every run, so the flow caches
    /// of decap and egress hold nothing the run can use (the first frame
    /// of a flow, or the first after the agent changed a map).
    cold_flow_cache: bool,
}

fn cases() -> Vec<Case> {
    let tc_ctx = || Some(skb_ctx(TEST_RUN_IFINDEX));
    let encap_overhead = ENCAP_OVERHEAD as isize;
    let outbound = |to, len| container_udp_frame(LOCAL_CONTAINER, to, len);
    let inbound = |to, len| {
        vxlan_frame(
            REMOTE_VTEP,
            LOCAL_VTEP,
            UNDERLAY_MAC,
            GATEWAY_MAC,
            VNI,
            &container_udp_frame(REMOTE_CONTAINER, to, len),
        )
    };
    let encap = |name, len, forwarding, cold_next_hop, cold_flow_cache| Case {
        name,
        program: programs::TC_EGRESS,
        hook: "TC (container veth)",
        frames: vec![outbound(REMOTE_CONTAINER, len)],
        ctx: tc_ctx(),
        expected_action: TC_ACT_REDIRECT,
        length_change: encap_overhead,
        forwarding,
        cold_next_hop,
        cold_flow_cache,
    };
    let decap = |name, len, program, hook, ctx, expected_action, cold_flow_cache| Case {
        name,
        program,
        hook,
        frames: vec![inbound(LOCAL_CONTAINER, len)],
        ctx,
        expected_action,
        length_change: -encap_overhead,
        forwarding: true,
        cold_next_hop: false,
        cold_flow_cache,
    };
    let xdp_decap = |name, len, cold_flow_cache| {
        decap(
            name,
            len,
            programs::XDP_DECAP,
            "XDP (underlay)",
            None,
            XDP_REDIRECT,
            cold_flow_cache,
        )
    };
    let tc_decap = |name, len, cold_flow_cache| {
        decap(
            name,
            len,
            programs::TC_DECAP,
            "TC ingress (underlay)",
            tc_ctx(),
            TC_ACT_REDIRECT,
            cold_flow_cache,
        )
    };
    // Many flows in turn, each to its own container: what a flow cache
    // holds of them decides what a frame costs.
    let encap_flows = |name, flows| Case {
        frames: (0..flows).map(|i| outbound(many_remote(i), 64)).collect(),
        ..encap(name, 64, true, false, false)
    };
    let decap_flows = |name, flows| Case {
        frames: (0..flows).map(|i| inbound(many_local(i), 64)).collect(),
        ..tc_decap(name, 64, false)
    };
    // Plain UDP to the host itself: what every non-overlay packet of the
    // underlay pays for the decap hook.
    let host_udp = ethernet(
        UNDERLAY_MAC,
        GATEWAY_MAC,
        ETH_P_IP,
        &ipv4(
            REMOTE_VTEP,
            LOCAL_VTEP,
            IPPROTO_UDP,
            &udp(5000, 53, &[0; 22]),
        ),
    );
    vec![
        encap(
            "encap 64 B, forwarding on, next hop cached",
            64,
            true,
            false,
            false,
        ),
        encap(
            "encap 1400 B, forwarding on, next hop cached",
            1400,
            true,
            false,
            false,
        ),
        encap(
            "encap 64 B, forwarding on, next hop cached, flow cache miss",
            64,
            true,
            false,
            true,
        ),
        encap(
            "encap 64 B, forwarding on, next hop and flow cache miss (bpf_fib_lookup)",
            64,
            true,
            true,
            true,
        ),
        encap(
            "encap 64 B, forwarding off, next hop cached (bpf_redirect_neigh)",
            64,
            false,
            false,
            false,
        ),
        encap(
            "encap 1400 B, forwarding off, next hop cached (bpf_redirect_neigh)",
            1400,
            false,
            false,
            false,
        ),
        encap(
            "encap 64 B, forwarding off, next hop and flow cache miss (bpf_redirect_neigh)",
            64,
            false,
            true,
            true,
        ),
        encap_flows(
            "encap 64 B, forwarding on, next hop cached, 64 flows in turn",
            64,
        ),
        encap_flows(
            "encap 64 B, forwarding on, next hop cached, 1024 flows in turn",
            MANY_FLOWS,
        ),
        xdp_decap("decap 64 B", 64, false),
        xdp_decap("decap 1400 B", 1400, false),
        tc_decap("decap 64 B", 64, false),
        tc_decap("decap 1400 B", 1400, false),
        xdp_decap("decap 64 B, flow cache miss", 64, true),
        tc_decap("decap 64 B, flow cache miss", 64, true),
        decap_flows("decap 64 B, 64 flows in turn", 64),
        decap_flows("decap 64 B, 1024 flows in turn", MANY_FLOWS),
        Case {
            name: "pass-through, non-VXLAN UDP 64 B",
            program: programs::XDP_DECAP,
            hook: "XDP (underlay)",
            frames: vec![host_udp.clone()],
            ctx: None,
            expected_action: XDP_PASS,
            length_change: 0,
            forwarding: true,
            cold_next_hop: false,
            cold_flow_cache: false,
        },
        Case {
            name: "pass-through, non-VXLAN UDP 64 B",
            program: programs::TC_DECAP,
            hook: "TC ingress (underlay)",
            frames: vec![host_udp],
            ctx: tc_ctx(),
            expected_action: TC_ACT_OK,
            length_change: 0,
            forwarding: true,
            cold_next_hop: false,
            cold_flow_cache: false,
        },
        Case {
            name: "same-host switch 64 B",
            program: programs::TC_EGRESS,
            hook: "TC (container veth)",
            frames: vec![outbound(NEIGHBOUR_CONTAINER, 64)],
            ctx: tc_ctx(),
            expected_action: TC_ACT_REDIRECT,
            length_change: 0,
            forwarding: true,
            cold_next_hop: false,
            cold_flow_cache: false,
        },
    ]
}

/// Flows of the largest many-flows case: remote containers
/// ([`many_remote`]) and local ones ([`many_local`]) the fixture gains.
const MANY_FLOWS: u32 = 1024;

/// The `i`th of [`MANY_FLOWS`] containers behind [`REMOTE_VTEP`].
fn many_remote(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + 1 + i)
}

/// The `i`th of [`MANY_FLOWS`] containers on this host (behind the test
/// run's interface, like [`LOCAL_CONTAINER`]).
fn many_local(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 32, 0)) + 1 + i)
}

/// Adds the many-flows cases' containers to the fixture's network, as
/// the agent would write them.
fn add_many_flows(fixture: &mut Fixture) -> Result<()> {
    let mut endpoints: Vec<([u8; 4], Endpoint)> = datapath::read_endpoints(fixture.pin_dir())?
        .into_iter()
        .filter(|(key, _)| key.vni == VNI)
        .map(|(key, endpoint)| (key.addr, endpoint))
        .collect();
    let endpoint = |addr: Ipv4Addr, ifindex, vtep: [u8; 4]| {
        (
            addr.octets(),
            Endpoint {
                mac: container_mac(addr),
                _pad: [0; 2],
                ifindex,
                vtep,
            },
        )
    };
    for i in 0..MANY_FLOWS {
        endpoints.push(endpoint(many_remote(i), 0, REMOTE_VTEP.octets()));
        endpoints.push(endpoint(many_local(i), TEST_RUN_IFINDEX, [0; 4]));
    }
    fixture
        .datapath
        .sync_network_endpoints(VNI, endpoints)
        .context("add the many-flows containers")?;
    Ok(())
}

struct Options {
    samples: usize,
    repeat: u32,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        samples: DEFAULT_SAMPLES,
        repeat: DEFAULT_REPEAT,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--samples" => options.samples = value.parse().context("--samples")?,
            "--repeat" => options.repeat = value.parse().context("--repeat")?,
            _ => bail!("unknown argument {flag}; usage: ovl-microbench [--samples N] [--repeat N]"),
        }
    }
    ensure!(options.samples > 0, "--samples must be positive");
    Ok(options)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ovl-microbench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let options = parse_args()?;
    // One CPU throughout: a case's runs then find what the runs before
    // them cached per CPU (decap's flow cache), as a flow's frames do.
    testbed::stay_on_one_cpu()?;
    let mut fixture = Fixture::new("micro")?;
    add_many_flows(&mut fixture)?;
    let mut rows = Vec::new();
    let mut next_hops = NextHops::open(&fixture)?;
    let mut epoch = Epoch::open(&fixture)?;
    for case in cases() {
        fixture.set_forwarding(case.forwarding)?;
        // What a case before it cached (with forwarding switched) is not
        // this case's path: neither in the next-hop cache nor in the flow
        // caches, which copy it.
        next_hops.clear()?;
        epoch.advance()?;
        let row = measure(&fixture, &mut next_hops, &mut epoch, &case, &options)
            .with_context(|| format!("{} ({})", case.name, case.program))?;
        rows.push(row);
    }
    println!("{}", Value::Array(rows));
    Ok(())
}

/// Checks the case takes the path it names, then times it.
fn measure(
    fixture: &Fixture,
    next_hops: &mut NextHops,
    epoch: &mut Epoch,
    case: &Case,
    options: &Options,
) -> Result<Value> {
    let datapath = &fixture.datapath;
    let ctx = case.ctx.as_deref();
    // Every flow once: each takes the path named, and is then in the
    // caches as far as they hold it.
    let mut first = None;
    for frame in &case.frames {
        let outcome = datapath.test_run(case.program, frame, ctx, 1)?;
        ensure!(
            outcome.action == case.expected_action,
            "returned action {} instead of {}: the fixture does not exercise this path",
            outcome.action,
            case.expected_action
        );
        let expected_len = frame.len() as isize + case.length_change;
        ensure!(
            outcome.output.len() as isize == expected_len,
            "output frame is {} bytes, expected {expected_len}",
            outcome.output.len()
        );
        first.get_or_insert(outcome);
    }
    let first = first.context("a case without frames")?;

    let mut single_ns = Vec::with_capacity(options.samples);
    for frame in case.frames.iter().cycle().take(options.samples) {
        if case.cold_next_hop {
            next_hops.clear()?;
        }
        if case.cold_flow_cache {
            epoch.advance()?;
        }
        let outcome = datapath.test_run(case.program, frame, ctx, 1)?;
        ensure!(
            outcome.action == case.expected_action,
            "a single run returned action {}",
            outcome.action
        );
        single_ns.push(nanos(outcome.duration));
    }
    single_ns.sort_unstable();

    let frame = &case.frames[0];
    let repeated = datapath.test_run(case.program, frame, ctx, options.repeat)?;
    // Only a program that leaves its input as it found it reruns the same
    // path: the last run's action and output say whether it did.
    let repeat_same_path = case.length_change == 0
        && repeated.action == case.expected_action
        && repeated.output == first.output;
    Ok(json!({
        "case": case.name,
        "program": case.program,
        "hook": case.hook,
        "frame_bytes": frame.len(),
        "expected_action": case.expected_action,
        "samples": options.samples,
        "single_median_ns": percentile(&single_ns, 50),
        "single_p90_ns": percentile(&single_ns, 90),
        "repeat": options.repeat,
        "repeat_mean_ns": nanos(repeated.duration),
        "repeat_same_path": repeat_same_path,
        "repeat_last_action": repeated.action,
    }))
}

/// The fixture's map `name`, opened from its pin; none (said on stderr)
/// when the object has no such map: an older build's, timed beside this
/// one through `OVL_EBPF_OBJECT`.
fn open_pinned(fixture: &Fixture, name: &str) -> Result<Option<Map>> {
    let path = fixture.pin_dir().join(name);
    if !path.exists() {
        eprintln!("ovl-microbench: no {name} in this object");
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(Some(Map::from_map_data(data)?))
}

/// The fixture's maps' epoch (`OVL_EPOCH`), opened from its pin; none in
/// an object from before the decap flow cache.
struct Epoch(Option<Array<MapData, u64>>);

impl Epoch {
    fn open(fixture: &Fixture) -> Result<Epoch> {
        let map = open_pinned(fixture, names::EPOCH)?;
        Ok(Epoch(map.map(Array::try_from).transpose()?))
    }

    /// Moves it on (to a value it never had), as the agent does after a
    /// change: every cached verdict is stale.
    fn advance(&mut self) -> Result<()> {
        let Some(map) = &mut self.0 else {
            return Ok(());
        };
        let next = map.get(&0, 0)?.wrapping_add(1).max(1);
        map.set(0, next, 0)?;
        Ok(())
    }
}

/// The fixture's next-hop cache (`OVL_NEXT_HOPS`), opened from its pin;
/// none in an object from before the cache (`OVL_EBPF_OBJECT`, to time
/// an older build beside this one).
struct NextHops(Option<HashMap<MapData, [u8; 4], NextHop>>);

impl NextHops {
    fn open(fixture: &Fixture) -> Result<NextHops> {
        let map = open_pinned(fixture, names::NEXT_HOPS)?;
        Ok(NextHops(map.map(HashMap::try_from).transpose()?))
    }

    /// Empties it: the next encapsulation asks the FIB.
    fn clear(&mut self) -> Result<()> {
        let Some(map) = &mut self.0 else {
            return Ok(());
        };
        let vteps: Vec<[u8; 4]> = map.keys().collect::<Result<_, _>>()?;
        for vtep in vteps {
            map.remove(&vtep)?;
        }
        Ok(())
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The `pct`th percentile of sorted, non-empty `values` (nearest rank).
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank - 1]
}
