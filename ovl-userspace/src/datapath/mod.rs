//! ovl's kernel programs as the agent holds them: the kernel object, loaded
//! with its maps pinned per node (reused, or replaced when they no longer
//! fit this build), the underlay decap hook and the egress hook on each
//! local container veth — all pinned bpf_links that outlive the agent.

mod compat;
mod links;
mod shadow;
mod slots;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, lpm_trie::LpmTrie},
    programs::XdpMode,
    util::nr_cpus,
};
pub use compat::Mismatch;
pub use links::{DecapKind, LinkPin, LinkPins};
use ovl_common::{
    Endpoint, Iface, NetworkInfo, NextHop, NodeConfig, PathMtu, SubnetInfo, UnderlayCounters,
    VniAddr, VniCounters, VtepInfo,
    counters::{UNATTRIBUTED_SLOT, UNATTRIBUTED_VNI},
    maps::{ABI_VERSION, capacity, names, programs, subnet_key_bits},
};

/// The kernel programs, built by build.rs and embedded in `ovl`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ovl-ebpf.o"));

/// Environment variable naming another kernel object to load instead of
/// the embedded one: for developing and testing program upgrades only.
pub const OBJECT_ENV: &str = "OVL_EBPF_OBJECT";

/// Sub-directory where replacement maps are built before they take the
/// place of pinned maps that no longer fit.
const STAGING_DIR: &str = "next";

/// The kernel object this agent runs: the embedded one or `$OVL_EBPF_OBJECT`.
fn object() -> Result<Cow<'static, [u8]>> {
    if let Some(path) = std::env::var_os(OBJECT_ENV) {
        let bytes = fs::read(&path)
            .with_context(|| format!("read {OBJECT_ENV}={}", Path::new(&path).display()))?;
        log::warn!(
            "loading kernel programs from {} ({OBJECT_ENV}) instead of the embedded ones",
            Path::new(&path).display()
        );
        return Ok(Cow::Owned(bytes));
    }
    if OBJECT.is_empty() {
        bail!(
            "this ovl was built without its kernel programs (OVL_EBPF_SKIP=1); rebuild with `cargo xtask build`"
        );
    }
    Ok(Cow::Borrowed(OBJECT))
}

/// Where the underlay decap program hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapMode {
    /// Pick by driver: TC on veth (native XDP there disables the peer's
    /// TSO), native XDP elsewhere, TC where the driver refuses native XDP.
    Auto,
    /// XDP in the driver.
    Native,
    /// XDP in the kernel's generic (skb) path.
    Generic,
    /// TC ingress (TCX).
    Tc,
}

impl FromStr for DecapMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DecapMode::Auto),
            "native" => Ok(DecapMode::Native),
            "generic" => Ok(DecapMode::Generic),
            "tc" => Ok(DecapMode::Tc),
            _ => Err(format!(
                "unknown mode {s:?}: use auto, native, generic or tc"
            )),
        }
    }
}

impl fmt::Display for DecapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecapMode::Auto => "auto",
            DecapMode::Native => "native",
            DecapMode::Generic => "generic",
            DecapMode::Tc => "tc",
        })
    }
}

impl DecapMode {
    fn of_kind(kind: DecapKind) -> DecapMode {
        match kind {
            DecapKind::Tc => DecapMode::Tc,
            DecapKind::XdpDriver => DecapMode::Native,
            DecapKind::XdpGeneric => DecapMode::Generic,
        }
    }
}

/// How the maps of a load relate to what was pinned before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Maps {
    /// Nothing was pinned: new, empty maps.
    Created,
    /// Pinned maps that fit this build are used as they are, entries and
    /// counters included.
    Reused,
    /// Pinned maps that do not fit this build: new ones were made beside
    /// them. Fill them, swap the programs in ([`Datapath::adopt_links`]),
    /// then [`Datapath::promote`] them into place.
    Replacing(Vec<Mismatch>),
}

/// What [`Datapath::adopt_links`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// Links whose program was swapped for this build's.
    pub replaced: Vec<LinkPin>,
    /// Links of interfaces that no longer exist, removed.
    pub removed: Vec<LinkPin>,
}

/// Loaded programs and their maps, pinned under one node directory.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: LinkPins,
    maps: Maps,
    /// Names of the maps the object pins.
    map_names: Vec<String>,
    /// What the maps hold, so syncs write only what changed.
    shadow: shadow::Shadow,
    /// VNI → slot of `OVL_STATS`, as the last [`sync_stats`](Self::sync_stats)
    /// assigned them; read from `OVL_NETWORKS` on the first.
    stats_slots: Option<BTreeMap<u32, u32>>,
    /// VNI → name of the network each slot counts, as the last
    /// [`sync_stats`](Self::sync_stats) left them; on the first, what the
    /// caller knows of the previous agent's.
    slot_networks: Option<BTreeMap<u32, String>>,
    /// The decap program's link on the crypto device, while one is hooked.
    crypto_link: Option<aya::programs::tc::SchedClassifierLinkId>,
}

impl Datapath {
    /// Loads the kernel object with its maps pinned in `pin_dir`: maps
    /// already pinned there are reused when they fit this build (a
    /// restarted agent keeps entries and counters), else new ones are made
    /// in `pin_dir/next` to replace them.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        let object = object()?;
        let mismatches = compat::check(pin_dir, &object)?;
        let any_pinned = names::ALL.iter().any(|n| pin_dir.join(n).exists());
        let (maps, map_dir) = if !mismatches.is_empty() {
            let staging = pin_dir.join(STAGING_DIR);
            // Left by a replacement that was cut short: start it over.
            crate::bpffs::remove_node_dir(&staging)?;
            fs::create_dir_all(&staging)
                .with_context(|| format!("create {}", staging.display()))?;
            (Maps::Replacing(mismatches), staging)
        } else if any_pinned {
            (Maps::Reused, pin_dir.to_owned())
        } else {
            (Maps::Created, pin_dir.to_owned())
        };
        let level = log::max_level() as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .override_global(aya_log::LEVEL, &level, true)
            .load(&object)
            .context("load ovl's kernel programs (is this root, with BPF enabled?)")?;
        for name in programs::ALL {
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?;
            match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            }
            .with_context(|| format!("verify and load {name}"))?;
        }
        let mut datapath = Datapath {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            links: LinkPins::of(pin_dir),
            maps,
            map_names: compat::pinned_map_names(&object)?,
            shadow: shadow::Shadow::default(),
            stats_slots: None,
            slot_networks: None,
            crypto_link: None,
        };
        // Reused maps may be in an epoch whose verdicts programs of another
        // build cached; a fresh map's 0 would keep the caches off.
        datapath.new_epoch()?;
        Ok(datapath)
    }

    /// Gives `OVL_EPOCH` a fresh random value: the programs' flow caches
    /// stop using every verdict they cached from the maps before. Random,
    /// not counted, so that a read racing the write (whose bytes the
    /// kernel copies without atomicity) finds an epoch no verdict was
    /// cached in, rather than a past one.
    fn new_epoch(&mut self) -> Result<()> {
        let mut bytes = [0u8; 8];
        crate::random::fill(&mut bytes).context("draw a new epoch for OVL_EPOCH")?;
        // 0 means "no epoch": caches off.
        let epoch = u64::from_ne_bytes(bytes).max(1);
        let mut arr: Array<_, u64> = Array::try_from(self.map(names::EPOCH)?)?;
        arr.set(0, epoch, 0).context("write OVL_EPOCH")
    }

    /// Ends the maps' epoch when a sync of `name` changed it and the flow
    /// caches copy from it (`names::EPOCH`); passes the outcome on. A sync
    /// that failed may have written part of what it had to: it ends the
    /// epoch too.
    fn synced(&mut self, name: &str, outcome: Result<SyncCount>) -> Result<SyncCount> {
        let cached = [
            names::VTEPS,
            names::ENDPOINTS,
            names::NETWORKS,
            names::IFACES,
        ];
        if cached.contains(&name)
            && outcome
                .as_ref()
                .map_or(true, |c| *c != SyncCount::default())
        {
            let renewed = self.new_epoch();
            let count = outcome?;
            renewed?;
            return Ok(count);
        }
        outcome
    }

    /// How this load's maps relate to the pins it found.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Records this build's ABI version beside the maps: call once they
    /// hold what the store says, so a later agent may reuse them.
    pub fn record_abi(&mut self) -> Result<()> {
        let mut arr: Array<_, u32> = Array::try_from(self.map(names::ABI)?)?;
        arr.set(0, ABI_VERSION, 0).context("write OVL_ABI")
    }

    /// Moves replacement maps into the place of the pins they replace.
    /// Call after [`adopt_links`](Self::adopt_links): the running programs
    /// then use the new maps already, and the old ones go with their pins.
    pub fn promote(&mut self) -> Result<()> {
        if !matches!(self.maps, Maps::Replacing(_)) {
            return Ok(());
        }
        let staging = self.pin_dir.join(STAGING_DIR);
        for name in &self.map_names {
            let (from, to) = (staging.join(name), self.pin_dir.join(name));
            match fs::remove_file(&to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("unpin {}", to.display())),
            }
            fs::rename(&from, &to)
                .with_context(|| format!("move {} to {}", from.display(), to.display()))?;
        }
        crate::bpffs::remove_node_dir(&staging)?;
        self.maps = Maps::Reused;
        Ok(())
    }

    /// Removes replacement maps that will not be promoted (the take-over
    /// failed): the pinned data path stays as it was.
    pub fn discard_staged(&mut self) {
        if matches!(self.maps, Maps::Replacing(_)) {
            let staging = self.pin_dir.join(STAGING_DIR);
            if let Err(e) = crate::bpffs::remove_node_dir(&staging) {
                log::warn!("{e:#}");
            }
        }
    }

    /// Takes the aya-log ring so the caller can forward kernel log lines.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("open the kernel programs' log ring")
    }

    /// Swaps this build's programs into every pinned link, atomically per
    /// link, and removes links whose interface is gone. What was pinned
    /// keeps forwarding throughout.
    pub fn adopt_links(&mut self) -> Result<Adopted> {
        let mut done = Adopted::default();
        for pin in self.links.list()? {
            if crate::netlink::ifname(pin.ifindex()).is_none() {
                self.links.remove(pin)?;
                done.removed.push(pin);
                continue;
            }
            let links = LinkPins::of(&self.pin_dir);
            match pin {
                LinkPin::Egress { .. } => {
                    links.replace_tc(self.program(programs::TC_EGRESS)?, pin)?
                }
                LinkPin::Decap {
                    kind: DecapKind::Tc,
                    ..
                } => links.replace_tc(self.program(programs::TC_DECAP)?, pin)?,
                LinkPin::Decap { .. } => {
                    links.replace_xdp(self.program(programs::XDP_DECAP)?, pin)?
                }
            }
            done.replaced.push(pin);
        }
        Ok(done)
    }

    /// Unpins the decap hooks whose interface is gone (their links went
    /// with it), so an interface made anew, under any index, is hooked
    /// again. Returns how many.
    pub fn forget_gone_decap(&mut self) -> Result<usize> {
        self.forget_decap_where(|ifindex| crate::netlink::ifname(ifindex).is_none())
    }

    /// Unpins the decap hook of the device that had index `ifindex` and was
    /// deleted, whatever holds the index now (a device made anew under
    /// it has none of the old one's hooks).
    pub fn forget_deleted_decap(&mut self, ifindex: u32) -> Result<usize> {
        self.forget_decap_where(|i| i == ifindex)
    }

    /// Unpins the decap hooks on the devices `gone` says are gone.
    fn forget_decap_where(&mut self, gone: impl Fn(u32) -> bool) -> Result<usize> {
        let mut n = 0;
        for pin in self.links.list()? {
            if matches!(pin, LinkPin::Decap { .. }) && gone(pin.ifindex()) {
                self.links.remove(pin)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The decap hook currently pinned, if any.
    pub fn decap_hook(&self) -> Result<Option<(DecapMode, u32)>> {
        Ok(self.links.list()?.into_iter().find_map(|p| match p {
            LinkPin::Decap { kind, ifindex } => Some((DecapMode::of_kind(kind), ifindex)),
            LinkPin::Egress { .. } => None,
        }))
    }

    /// Hooks the decap program on the underlay `iface` (index `ifindex`)
    /// in `mode` unless that very hook is pinned already (then
    /// [`adopt_links`](Self::adopt_links) has updated it), and removes any
    /// other decap hook once the new one is in place. Returns the mode used.
    pub fn hook_decap(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: DecapMode,
        driver: &str,
    ) -> Result<DecapMode> {
        let mode = match mode {
            DecapMode::Auto if driver == "veth" => DecapMode::Tc,
            other => other,
        };
        let links = LinkPins::of(&self.pin_dir);
        let wanted = |kind| LinkPin::Decap { kind, ifindex };
        let used = match mode {
            DecapMode::Tc => {
                let pin = wanted(DecapKind::Tc);
                if !links.has(pin) {
                    links
                        .attach_tc(self.program(programs::TC_DECAP)?, iface, pin)
                        .with_context(|| format!("hook {}", programs::TC_DECAP))?;
                }
                DecapKind::Tc
            }
            DecapMode::Native | DecapMode::Generic => {
                let (kind, xdp_mode) = if mode == DecapMode::Native {
                    (DecapKind::XdpDriver, XdpMode::Driver)
                } else {
                    (DecapKind::XdpGeneric, XdpMode::Skb)
                };
                let pin = wanted(kind);
                if !links.has(pin) {
                    links
                        .attach_xdp(self.program(programs::XDP_DECAP)?, iface, xdp_mode, pin)
                        .with_context(|| {
                            format!("hook {} in {mode} XDP mode on {iface}", programs::XDP_DECAP)
                        })?;
                }
                kind
            }
            DecapMode::Auto => {
                let pin = wanted(DecapKind::XdpDriver);
                if links.has(pin) {
                    DecapKind::XdpDriver
                } else {
                    match links.attach_xdp(
                        self.program(programs::XDP_DECAP)?,
                        iface,
                        XdpMode::Driver,
                        pin,
                    ) {
                        Ok(()) => DecapKind::XdpDriver,
                        Err(e) => {
                            // Not generic XDP: it sees GRO super-packets it
                            // cannot redirect (measured: TCP stalls). TC sees
                            // the same packets and keeps their GSO state.
                            log::warn!("native XDP refused on {iface} ({e:#}); using TC ingress");
                            return self.hook_decap(iface, ifindex, DecapMode::Tc, driver);
                        }
                    }
                }
            }
        };
        for pin in links.list()? {
            if matches!(pin, LinkPin::Decap { .. }) && pin != wanted(used) {
                links.remove(pin)?;
                log::info!("removed the previous decap hook {}", pin.file_name());
            }
        }
        Ok(DecapMode::of_kind(used))
    }

    /// Host-side ifindexes that carry the egress hook.
    pub fn egress_ifindexes(&self) -> Result<BTreeSet<u32>> {
        Ok(self
            .links
            .list()?
            .into_iter()
            .filter_map(|p| match p {
                LinkPin::Egress { ifindex } => Some(ifindex),
                LinkPin::Decap { .. } => None,
            })
            .collect())
    }

    /// Hooks container egress on the host end `ifname` (index `ifindex`).
    pub fn hook_egress(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        let links = LinkPins::of(&self.pin_dir);
        links
            .attach_tc(
                self.program(programs::TC_EGRESS)?,
                ifname,
                LinkPin::Egress { ifindex },
            )
            .with_context(|| format!("hook {} on {ifname}", programs::TC_EGRESS))
    }

    /// Unhooks the egress program from `ifindex`.
    pub fn unhook_egress(&mut self, ifindex: u32) -> Result<()> {
        self.links.remove(LinkPin::Egress { ifindex })
    }

    /// Makes `ifindex` (the agent's crypto device, named `ifname`) the way
    /// out and in for encrypted networks: the decap program on its TC
    /// ingress, then its entry in `OVL_CRYPTO`. Neither is pinned: both go
    /// with the device, which goes with the agent, so encrypted networks
    /// fail closed when it exits. A device hooked before (the encrypting
    /// path started again) is let go first.
    pub fn hook_crypto(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        let before = self.crypto_link.take();
        let prog: &mut aya::programs::SchedClassifier = self.program(programs::TC_DECAP)?;
        if let Some(link) = before {
            // Gone with its device already, usually.
            let _ = prog.detach(link);
        }
        let link = prog
            .attach(ifname, aya::programs::TcAttachType::Ingress)
            .with_context(|| {
                format!("hook {} on the crypto device {ifname}", programs::TC_DECAP)
            })?;
        self.crypto_link = Some(link);
        let mut map: aya::maps::DevMap<_> = aya::maps::DevMap::try_from(self.map(names::CRYPTO)?)?;
        map.set(ovl_common::maps::CRYPTO_DEVICE, ifindex, None, 0)
            .context("write OVL_CRYPTO")
    }

    /// Runs program `name` once (or `repeat` times) on `packet` with
    /// BPF_PROG_TEST_RUN, without any interface: the golden-packet tests
    /// and the micro-benchmark use it. `ctx` is a raw `__sk_buff` for TC
    /// programs (e.g. to set `ifindex`).
    pub fn test_run(
        &self,
        name: &str,
        packet: &[u8],
        ctx: Option<&[u8]>,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        use aya::programs::{Program, TestRun, TestRunOptions};
        // Room for what encapsulation adds.
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat: repeat.max(1),
            ..Default::default()
        };
        let prog = self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name} missing"))?;
        let result = match prog {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("program {name} cannot be test-run"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            action: result.return_value,
            output: out,
            duration: result.duration,
        })
    }

    fn program<T>(&mut self, name: &str) -> Result<&mut T>
    where
        for<'a> &'a mut T:
            TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let prog = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?;
        prog.try_into()
            .with_context(|| format!("program {name} has an unexpected type"))
    }

    fn map(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    /// Writes this node's underlay identity.
    pub fn set_config(&mut self, cfg: NodeConfig) -> Result<()> {
        let mut arr: Array<_, NodeConfig> = Array::try_from(self.map(names::CONFIG)?)?;
        arr.set(0, cfg, 0).context("write OVL_CONFIG")
    }

    /// This node's underlay identity as the programs see it (all zero
    /// before the first [`set_config`](Self::set_config)).
    pub fn config(&mut self) -> Result<NodeConfig> {
        let arr: Array<_, NodeConfig> = Array::try_from(self.map(names::CONFIG)?)?;
        arr.get(&0, 0).context("read OVL_CONFIG")
    }

    /// Empties the next-hop cache (`OVL_NEXT_HOPS`): the next packet to each
    /// VTEP asks the FIB again. Returns how many entries there were.
    ///
    /// Egress's flow cache copies next hops, so every change the agent
    /// makes to `OVL_NEXT_HOPS` (here, [`set_next_hop`](Self::set_next_hop),
    /// [`forget_next_hop`](Self::forget_next_hop)) ends the maps' epoch:
    /// the next packet of every flow reads the map again.
    pub fn clear_next_hops(&mut self) -> Result<usize> {
        let mut map = self.next_hop_map()?;
        let vteps: Vec<[u8; 4]> = map.keys().filter_map(|k| k.ok()).collect();
        for vtep in &vteps {
            // Gone already (evicted, or emptied by another clear): fine.
            let _ = map.remove(vtep);
        }
        self.new_epoch()?;
        Ok(vteps.len())
    }

    /// The next-hop cache's entries (`OVL_NEXT_HOPS`), keyed by remote VTEP.
    pub fn next_hops(&mut self) -> Result<Vec<([u8; 4], NextHop)>> {
        // An entry evicted between listing and reading is skipped.
        Ok(self.next_hop_map()?.iter().filter_map(|e| e.ok()).collect())
    }

    /// Writes the next hop to `vtep` into the cache (a new epoch, see
    /// [`clear_next_hops`](Self::clear_next_hops)).
    pub fn set_next_hop(&mut self, vtep: [u8; 4], hop: NextHop) -> Result<()> {
        let written = self
            .next_hop_map()?
            .insert(vtep, hop, 0)
            .context("write OVL_NEXT_HOPS");
        self.new_epoch()?;
        written
    }

    /// Drops the cached next hop to `vtep` (gone already is fine; a new
    /// epoch, see [`clear_next_hops`](Self::clear_next_hops)).
    pub fn forget_next_hop(&mut self, vtep: [u8; 4]) -> Result<()> {
        let _ = self.next_hop_map()?.remove(&vtep);
        self.new_epoch()
    }

    fn next_hop_map(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], NextHop>> {
        Ok(HashMap::try_from(self.map(names::NEXT_HOPS)?)?)
    }

    /// Sets the VXLAN UDP port encapsulation sends to and decapsulation
    /// accepts; returns whether it was another before.
    pub fn set_vxlan_port(&mut self, port: u16) -> Result<bool> {
        let mut cfg = self.config()?;
        if cfg.udp_port == port {
            return Ok(false);
        }
        let changed = cfg.vxlan_port() != port;
        cfg.udp_port = port;
        self.set_config(cfg)?;
        Ok(changed)
    }

    /// Makes OVL_IFACES hold exactly `want` (host ifindex → interface).
    pub fn sync_ifaces(&mut self, want: &BTreeMap<u32, Iface>) -> Result<SyncCount> {
        self.sync_map(names::IFACES, want.iter().map(|(k, v)| (*k, *v)))
    }

    /// Makes OVL_SUBNETS hold exactly `want`: (VNI, subnet address,
    /// prefix length) → subnet.
    pub fn sync_subnets(
        &mut self,
        want: &BTreeMap<(u32, [u8; 4], u8), SubnetInfo>,
    ) -> Result<SyncCount> {
        let name = names::SUBNETS;
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))?;
        let mut map: LpmTrie<_, VniAddr, SubnetInfo> = LpmTrie::try_from(map)?;
        let want = want.iter().map(|((vni, addr, prefix), v)| {
            (
                subnet_key_bits(*prefix),
                VniAddr {
                    vni: *vni,
                    addr: *addr,
                },
                *v,
            )
        });
        self.shadow.sync_trie(name, &mut map, want)
    }

    /// Makes OVL_NETWORKS hold exactly `want` (VNI → network).
    pub fn sync_networks(&mut self, want: &BTreeMap<u32, NetworkInfo>) -> Result<SyncCount> {
        self.sync_map(names::NETWORKS, want.iter().map(|(k, v)| (*k, *v)))
    }

    /// Makes OVL_ENDPOINTS hold exactly `want`.
    pub fn sync_endpoints(
        &mut self,
        want: &BTreeMap<(u32, [u8; 4]), Endpoint>,
    ) -> Result<SyncCount> {
        let mut by_vni: BTreeMap<u32, Vec<([u8; 4], Endpoint)>> = BTreeMap::new();
        for ((vni, addr), ep) in want {
            by_vni.entry(*vni).or_default().push((*addr, *ep));
        }
        let mut count = SyncCount::default();
        for (vni, entries) in &by_vni {
            count += self.sync_network_endpoints(*vni, entries.iter().copied())?;
        }
        count += self.keep_network_endpoints(&by_vni.keys().copied().collect())?;
        Ok(count)
    }

    /// Makes OVL_ENDPOINTS hold exactly `want` (address → endpoint) for
    /// network `vni`, leaving other networks' entries alone.
    pub fn sync_network_endpoints(
        &mut self,
        vni: u32,
        want: impl IntoIterator<Item = ([u8; 4], Endpoint)>,
    ) -> Result<SyncCount> {
        let (shadow, mut map) = self.endpoints_map()?;
        let outcome = shadow.sync_part(
            names::ENDPOINTS,
            &mut map,
            vni_of,
            vni,
            want.into_iter()
                .map(|(addr, ep)| (VniAddr { vni, addr }, ep)),
        );
        self.synced(names::ENDPOINTS, outcome)
    }

    /// Removes OVL_ENDPOINTS entries of every network but `vnis`.
    pub fn keep_network_endpoints(&mut self, vnis: &BTreeSet<u32>) -> Result<SyncCount> {
        let (shadow, mut map) = self.endpoints_map()?;
        let outcome = shadow.keep_parts(names::ENDPOINTS, &mut map, vni_of, vnis);
        self.synced(names::ENDPOINTS, outcome)
    }

    fn endpoints_map(
        &mut self,
    ) -> Result<(
        &mut shadow::Shadow,
        HashMap<&mut MapData, VniAddr, Endpoint>,
    )> {
        let name = names::ENDPOINTS;
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))?;
        Ok((&mut self.shadow, HashMap::try_from(map)?))
    }

    /// Makes OVL_VTEPS hold exactly `want`: (VNI, remote VTEP) → its flags
    /// and its network's entry.
    pub fn sync_vteps(&mut self, want: &BTreeMap<(u32, [u8; 4]), VtepInfo>) -> Result<SyncCount> {
        self.sync_map(
            names::VTEPS,
            want.iter().map(|((vni, addr), v)| {
                (
                    VniAddr {
                        vni: *vni,
                        addr: *addr,
                    },
                    *v,
                )
            }),
        )
    }

    /// Makes hash map `name` hold exactly `want`, writing only what
    /// differs from what it holds (see [`shadow`]).
    pub fn sync_map<K, V>(
        &mut self,
        name: &str,
        want: impl IntoIterator<Item = (K, V)>,
    ) -> Result<SyncCount>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))?;
        let mut map: HashMap<_, K, V> = HashMap::try_from(map)?;
        let outcome = self.shadow.sync(name, &mut map, want);
        self.synced(name, outcome)
    }

    /// Gives every network of `networks` (VNI → name) a slot of
    /// `OVL_STATS`: a network this node served already keeps its slot and
    /// counts (also across agent restarts: the slots are read back from
    /// `OVL_NETWORKS`), a new one gets a free slot, zeroed — and so does a
    /// VNI that now belongs to another network than its slot counted
    /// (`before`: VNI → name as the previous agent knew them, used on the
    /// first call). Returns VNI → slot, for the entries that carry it
    /// (networks, VTEPs, interfaces); write those after this.
    pub fn sync_stats(
        &mut self,
        networks: &BTreeMap<u32, String>,
        before: &BTreeMap<u32, String>,
    ) -> Result<BTreeMap<u32, u32>> {
        let mut held = match self.stats_slots.take() {
            Some(held) => held,
            None => self.held_stats_slots()?,
        };
        let counted = self.slot_networks.take().unwrap_or_else(|| before.clone());
        for vni in slots::renewed(&counted, networks) {
            log::info!(
                "VNI {vni} now belongs to network {}, not {}: its counters start again",
                networks[&vni],
                counted[&vni]
            );
            held.remove(&vni);
        }
        self.slot_networks = Some(networks.clone());
        let want: BTreeSet<u32> = networks.keys().copied().collect();
        let (slots, fresh) = slots::assign(&held, &want).with_context(|| {
            format!(
                "{} networks on this node, more than the {} counter slots of OVL_STATS",
                want.len(),
                capacity::STATS - 1
            )
        })?;
        let ncpus = nr_cpus().map_err(|(_, e)| e).context("count CPUs")?;
        let mut map: PerCpuArray<_, VniCounters> = PerCpuArray::try_from(self.map(names::STATS)?)?;
        for slot in fresh {
            let zero = PerCpuValues::try_from(vec![VniCounters::default(); ncpus])
                .context("per-CPU zero counters")?;
            map.set(slot, zero, 0)
                .with_context(|| format!("zero slot {slot} of OVL_STATS"))?;
        }
        self.stats_slots = Some(slots.clone());
        Ok(slots)
    }

    /// The slots the networks in `OVL_NETWORKS` hold (a previous agent's,
    /// when the maps were reused).
    fn held_stats_slots(&mut self) -> Result<BTreeMap<u32, u32>> {
        let map: HashMap<_, u32, NetworkInfo> = HashMap::try_from(self.map(names::NETWORKS)?)?;
        let mut held = BTreeMap::new();
        for entry in map.iter() {
            let (vni, info) = entry.context("read OVL_NETWORKS")?;
            if info.stats_slot != UNATTRIBUTED_SLOT && info.stats_slot < capacity::STATS {
                held.insert(vni, info.stats_slot);
            }
        }
        Ok(held)
    }
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug, Clone)]
pub struct TestRunOutcome {
    /// The program's return value (XDP or TC action).
    pub action: u32,
    /// The packet as the program left it.
    pub output: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// The network of an OVL_ENDPOINTS key: the partition its entries are
/// synced in.
fn vni_of(key: &VniAddr) -> u32 {
    key.vni
}

/// Entries added or changed, and removed, by one map sync.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncCount {
    pub written: usize,
    pub removed: usize,
}

impl std::ops::AddAssign for SyncCount {
    fn add_assign(&mut self, other: SyncCount) {
        self.written += other.written;
        self.removed += other.removed;
    }
}

/// Per-VNI counters summed over CPUs, read from a node's pinned maps: each
/// network's from the slot its `OVL_NETWORKS` entry names, and
/// [`UNATTRIBUTED_VNI`]'s.
pub fn read_counters(pin_dir: &Path) -> Result<BTreeMap<u32, VniCounters>> {
    let stats = open_pinned(pin_dir, names::STATS)?;
    let stats: PerCpuArray<_, VniCounters> = PerCpuArray::try_from(stats).map_err(|e| match e {
        // Pinned by a build with other counters (an agent not upgraded yet).
        aya::maps::MapError::InvalidValueSize { size, expected } => anyhow::anyhow!(
            "{} was pinned by another ovl build: value size {expected}, this build reads {size} ({}). An agent of this build replaces it when it starts (`ovl attach`); until then, read it with the ovl that pinned it",
            pin_dir.join(names::STATS).display(),
            compat::counters_layout(expected as u32)
        ),
        e => e.into(),
    })?;
    let networks = open_pinned(pin_dir, names::NETWORKS)?;
    let networks: HashMap<_, u32, NetworkInfo> = HashMap::try_from(networks)?;
    let sum = |slot: u32| -> Result<VniCounters> {
        let per_cpu = stats
            .get(&slot, 0)
            .with_context(|| format!("read slot {slot} of OVL_STATS"))?;
        let mut sum = VniCounters::default();
        for c in per_cpu.iter() {
            sum.accumulate(c);
        }
        Ok(sum)
    };
    let mut out = BTreeMap::from([(UNATTRIBUTED_VNI, sum(UNATTRIBUTED_SLOT)?)]);
    for entry in networks.iter() {
        let (vni, info) = entry.context("read OVL_NETWORKS")?;
        out.insert(vni, sum(info.stats_slot)?);
    }
    Ok(out)
}

/// Node-wide underlay counters summed over CPUs.
pub fn read_global(pin_dir: &Path) -> Result<UnderlayCounters> {
    let map = open_pinned(pin_dir, names::GLOBAL)?;
    let arr: aya::maps::PerCpuArray<_, UnderlayCounters> = aya::maps::PerCpuArray::try_from(map)?;
    let per_cpu = arr.get(&0, 0).context("read OVL_GLOBAL")?;
    let mut sum = UnderlayCounters::default();
    for c in per_cpu.iter() {
        sum.accumulate(c);
    }
    Ok(sum)
}

/// Path MTUs to remote VTEPs the underlay reported, from a node's pins.
pub fn read_path_mtus(pin_dir: &Path) -> Result<Vec<([u8; 4], PathMtu)>> {
    let map = open_pinned(pin_dir, names::PATH_MTU)?;
    let map: HashMap<_, [u8; 4], PathMtu> = HashMap::try_from(map)?;
    map.iter()
        .collect::<Result<_, _>>()
        .context("read OVL_PATH_MTU")
}

/// The next-hop cache of a node's pins, for inspection and tests.
pub fn read_next_hops(pin_dir: &Path) -> Result<Vec<([u8; 4], NextHop)>> {
    let map = open_pinned(pin_dir, names::NEXT_HOPS)?;
    let map: HashMap<_, [u8; 4], NextHop> = HashMap::try_from(map)?;
    map.iter()
        .collect::<Result<_, _>>()
        .context("read OVL_NEXT_HOPS")
}

/// Endpoint entries of a node's pinned map, for inspection and tests.
pub fn read_endpoints(pin_dir: &Path) -> Result<Vec<(VniAddr, Endpoint)>> {
    let map = open_pinned(pin_dir, names::ENDPOINTS)?;
    let map: HashMap<_, VniAddr, Endpoint> = HashMap::try_from(map)?;
    map.iter()
        .collect::<Result<_, _>>()
        .context("read OVL_ENDPOINTS")
}

fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no ovl agent state at {} — is `ovl attach` running for this node (same --node and --pin-root)?",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("open {}", path.display()))
}
