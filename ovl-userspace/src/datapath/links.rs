//! The programs' attachments as pinned bpf_links, so they outlive the agent:
//! `links/decap-<kind>-<ifindex>` on the underlay and `links/egress-<ifindex>`
//! on each container veth. A new agent swaps its programs into them
//! atomically (BPF_LINK_UPDATE) instead of detaching and attaching.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};

use crate::bpffs::LINKS_DIR;

/// How a decap link is attached; part of its pin's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapKind {
    /// TCX ingress.
    Tc,
    /// XDP in the driver.
    XdpDriver,
    /// XDP in the generic (skb) path.
    XdpGeneric,
}

impl DecapKind {
    const ALL: [DecapKind; 3] = [DecapKind::Tc, DecapKind::XdpDriver, DecapKind::XdpGeneric];

    fn tag(self) -> &'static str {
        match self {
            DecapKind::Tc => "tc",
            DecapKind::XdpDriver => "xdpdrv",
            DecapKind::XdpGeneric => "xdpgeneric",
        }
    }
}

impl fmt::Display for DecapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tag())
    }
}

/// A link pin, parsed from its file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPin {
    /// The underlay hook.
    Decap { kind: DecapKind, ifindex: u32 },
    /// A container veth's egress hook.
    Egress { ifindex: u32 },
}

impl LinkPin {
    /// The pin's file name.
    pub fn file_name(self) -> String {
        match self {
            LinkPin::Decap { kind, ifindex } => format!("decap-{kind}-{ifindex}"),
            LinkPin::Egress { ifindex } => format!("egress-{ifindex}"),
        }
    }

    fn parse(name: &str) -> Option<LinkPin> {
        if let Some(idx) = name.strip_prefix("egress-") {
            return Some(LinkPin::Egress {
                ifindex: idx.parse().ok()?,
            });
        }
        let rest = name.strip_prefix("decap-")?;
        let (tag, idx) = rest.rsplit_once('-')?;
        let kind = DecapKind::ALL.into_iter().find(|k| k.tag() == tag)?;
        Some(LinkPin::Decap {
            kind,
            ifindex: idx.parse().ok()?,
        })
    }

    /// The interface the link is attached to.
    pub fn ifindex(self) -> u32 {
        match self {
            LinkPin::Decap { ifindex, .. } | LinkPin::Egress { ifindex } => ifindex,
        }
    }
}

/// The link pins of a node's pin directory.
pub struct LinkPins {
    dir: PathBuf,
}

impl LinkPins {
    /// The pins under `<pin_dir>/links`.
    pub fn of(pin_dir: &Path) -> LinkPins {
        LinkPins {
            dir: pin_dir.join(LINKS_DIR),
        }
    }

    fn path(&self, pin: LinkPin) -> PathBuf {
        self.dir.join(pin.file_name())
    }

    /// True when `pin` exists.
    pub fn has(&self, pin: LinkPin) -> bool {
        self.path(pin).exists()
    }

    /// Every link pinned here (unknown file names are skipped).
    pub fn list(&self) -> Result<Vec<LinkPin>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("list {}", self.dir.display())),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("list {}", self.dir.display()))?;
            match entry.file_name().to_str().and_then(LinkPin::parse) {
                Some(pin) => out.push(pin),
                None => log::warn!("ignoring unknown pin {}", entry.path().display()),
            }
        }
        out.sort_by_key(|p| p.file_name());
        Ok(out)
    }

    /// Removes every link pinned here and waits (up to `timeout`) until the
    /// kernel has released them: it frees an unpinned link in deferred
    /// work, and until then its program still runs. Returns how many there
    /// were.
    pub fn remove_all_and_wait(&self, timeout: std::time::Duration) -> Result<usize> {
        let pins = self.list()?;
        let mut ids = Vec::new();
        for pin in &pins {
            if let Ok(link) = self.open(*pin)
                && let Ok(info) = link.info()
            {
                ids.push(info.id());
            }
            self.remove(*pin)?;
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let alive = aya::programs::loaded_links()
                .filter_map(Result::ok)
                .any(|l| ids.contains(&l.id()));
            if !alive {
                return Ok(pins.len());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the kernel still holds links {ids:?} {timeout:?} after their pins were removed"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Removes `pin`: the last reference goes, so the link detaches.
    pub fn remove(&self, pin: LinkPin) -> Result<()> {
        match fs::remove_file(self.path(pin)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("unpin {}", self.path(pin).display())),
        }
    }

    fn open(&self, pin: LinkPin) -> Result<FdLink> {
        let path = self.path(pin);
        let link = PinnedLink::from_pin(&path)
            .with_context(|| format!("open the pinned link {}", path.display()))?;
        Ok(FdLink::from(link))
    }

    fn pin(&self, link: FdLink, pin: LinkPin) -> Result<()> {
        let path = self.path(pin);
        // Dropping the PinnedLink closes our descriptor; the pin holds on.
        link.pin(&path)
            .with_context(|| format!("pin the link {}", path.display()))?;
        Ok(())
    }

    /// Swaps `prog` into the TCX link pinned as `pin` (atomic: every packet
    /// runs either the old or the new program).
    pub fn replace_tc(&self, prog: &mut SchedClassifier, pin: LinkPin) -> Result<()> {
        let link = SchedClassifierLink::try_from(self.open(pin)?)
            .with_context(|| format!("{} is not a TC link", pin.file_name()))?;
        let id = prog
            .attach_to_link(link)
            .with_context(|| format!("update the program of link {}", pin.file_name()))?;
        drop(prog.take_link(id)?);
        Ok(())
    }

    /// Swaps `prog` into the XDP link pinned as `pin`.
    pub fn replace_xdp(&self, prog: &mut Xdp, pin: LinkPin) -> Result<()> {
        let link = XdpLink::try_from(self.open(pin)?)
            .with_context(|| format!("{} is not an XDP link", pin.file_name()))?;
        let id = prog
            .attach_to_link(link)
            .with_context(|| format!("update the program of link {}", pin.file_name()))?;
        drop(prog.take_link(id)?);
        Ok(())
    }

    /// Attaches `prog` to TC ingress of `ifname` as a TCX link and pins it.
    pub fn attach_tc(&self, prog: &mut SchedClassifier, ifname: &str, pin: LinkPin) -> Result<()> {
        let id = prog
            .attach(ifname, TcAttachType::Ingress)
            .with_context(|| format!("attach to TC ingress of {ifname}"))?;
        let link = FdLink::try_from(prog.take_link(id)?).map_err(|_| {
            anyhow::anyhow!(
                "the kernel attached a netlink TC filter, not a TCX link, on {ifname}; ovl needs Linux ≥ 6.6 (TCX) so the hook can outlive the agent"
            )
        })?;
        self.pin(link, pin)
    }

    /// Attaches `prog` to `ifname` in XDP `mode` as a bpf_link and pins it.
    pub fn attach_xdp(
        &self,
        prog: &mut Xdp,
        ifname: &str,
        mode: XdpMode,
        pin: LinkPin,
    ) -> Result<()> {
        let id = prog.attach(ifname, mode)?;
        let link = match FdLink::try_from(prog.take_link(id)?) {
            Ok(link) => link,
            Err(_) => bail!(
                "the kernel attached XDP on {ifname} the legacy netlink way, not as a bpf_link; ovl needs Linux ≥ 5.9 so the hook can outlive the agent"
            ),
        };
        self.pin(link, pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        for pin in [
            LinkPin::Egress { ifindex: 17 },
            LinkPin::Decap {
                kind: DecapKind::Tc,
                ifindex: 2,
            },
            LinkPin::Decap {
                kind: DecapKind::XdpDriver,
                ifindex: 3,
            },
            LinkPin::Decap {
                kind: DecapKind::XdpGeneric,
                ifindex: 4,
            },
        ] {
            assert_eq!(LinkPin::parse(&pin.file_name()), Some(pin));
        }
        for bad in [
            "egress-",
            "egress-x",
            "decap-tc",
            "decap-udp-3",
            "OVL_STATS",
        ] {
            assert_eq!(LinkPin::parse(bad), None, "{bad}");
        }
    }
}
