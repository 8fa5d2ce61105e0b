//! The WireGuard tunnels to other nodes. A tunnel is one boringtun `Tunn`
//! for one pair of static keys (this node's, the peer's); a key rotation on
//! either side makes a new pair, so a peer has a few "generations" of
//! tunnels for a while: the newest one sends as soon as it has a session,
//! the older ones keep receiving what is still in flight until they age
//! out. That is how a rotation loses no packet.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use boringtun::noise::Tunn;

use super::keys::{Identity, PublicKey};

/// A session is used for sending while younger than this (WireGuard's
/// Reject-After-Time is 180 s; keep a margin so a message sealed now is
/// still accepted when it lands).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(170);
/// How long older tunnels keep receiving once the newest one carries
/// traffic: far longer than anything stays in flight.
pub const DRAIN: Duration = Duration::from_secs(15);
/// A tunnel with no session at all is given up after this (its handshake
/// never completed: the peer does not hold that key any more).
pub const ABANDON: Duration = Duration::from_secs(60);

/// A node to talk to, as the store publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Node name.
    pub node: String,
    /// Its VTEP address: where its WireGuard listens, and the only source
    /// address the VXLAN it sends may carry.
    pub vtep: Ipv4Addr,
    /// Its current public key.
    pub key: PublicKey,
    /// Its WireGuard UDP port.
    pub port: u16,
    /// Its underlay's MTU as its agent reported it (None: not reported):
    /// what it receives bounds what is padded for it.
    pub underlay_mtu: Option<u32>,
}

/// One tunnel: one pair of static keys.
pub struct Generation {
    /// 24-bit id: the high bits of every session index of this tunnel, so
    /// a received message finds its tunnel by its receiver index.
    pub id: u32,
    /// This node's public key in the pair.
    pub mine: PublicKey,
    /// The peer's.
    pub theirs: PublicKey,
    pub tunn: Tunn,
    /// Before this, the tunnel waits for the peer to start the handshake
    /// (this node just rotated: peers need a moment to read its new key).
    pub initiate_after: Instant,
    pub created: Instant,
    /// Since when the tunnel has been the one sending.
    pub sending_since: Option<Instant>,
    /// Packets waiting for its handshake.
    pub staged: Staged,
}

/// Packets to send on a tunnel whose handshake has not completed, kept by
/// the engine rather than boringtun, which would seal them out of its
/// sight (no ECN field on the wire, no count of their own length).
#[derive(Default)]
pub struct Staged {
    /// Oldest first, as they came.
    pub packets: VecDeque<Vec<u8>>,
    /// When the oldest of them came.
    pub since: Option<Instant>,
}

/// Most packets staged per tunnel (boringtun's queue depth): beyond, the
/// oldest goes.
pub const MAX_STAGED: usize = 256;

impl Staged {
    /// Adds `packet`; returns how many older ones made room for it.
    pub fn push(&mut self, packet: &[u8], now: Instant) -> usize {
        let mut dropped = 0;
        while self.packets.len() >= MAX_STAGED {
            self.packets.pop_front();
            dropped += 1;
        }
        self.packets.push_back(packet.to_vec());
        self.since.get_or_insert(now);
        dropped
    }

    /// Packets staged.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Takes every packet staged, oldest first.
    pub fn take(&mut self) -> VecDeque<Vec<u8>> {
        self.since = None;
        std::mem::take(&mut self.packets)
    }
}

impl Generation {
    /// True while the tunnel has a session fit to send with.
    pub fn live(&self) -> bool {
        self.tunn
            .time_since_last_handshake()
            .is_some_and(|age| age < SESSION_LIFETIME)
    }
}

/// What this node knows of a peer, and its tunnels.
pub struct Peer {
    pub info: PeerInfo,
    /// Oldest first.
    pub gens: Vec<Generation>,
}

/// Which tunnel to send with.
pub struct Sender {
    /// Index into `gens`.
    pub index: usize,
    /// The newest tunnel should start its handshake now (an older one
    /// carries the traffic meanwhile).
    pub handshake_newest: bool,
}

impl Peer {
    /// Where its WireGuard listens.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.info.vtep, self.info.port))
    }

    /// Position of the tunnel for this node's key `mine` and the peer's
    /// current key.
    pub fn newest(&self, mine: &PublicKey) -> Option<usize> {
        self.gens
            .iter()
            .position(|g| g.mine == *mine && g.theirs == self.info.key)
    }

    /// The tunnel to send with: the newest pair of keys once it has a
    /// session, else the youngest older tunnel that still has one (while
    /// the newest handshakes), else the newest (it queues the packet and
    /// starts the handshake).
    pub fn sender(&self, mine: &PublicKey, now: Instant) -> Option<Sender> {
        let newest = self.newest(mine)?;
        if self.gens[newest].live() {
            return Some(Sender {
                index: newest,
                handshake_newest: false,
            });
        }
        let older = self
            .gens
            .iter()
            .enumerate()
            .filter(|(i, g)| *i != newest && g.live())
            .min_by_key(|(_, g)| g.tunn.time_since_last_handshake())
            .map(|(i, _)| i);
        Some(match older {
            Some(index) => Sender {
                index,
                handshake_newest: now >= self.gens[newest].initiate_after,
            },
            None => Sender {
                index: newest,
                handshake_newest: false,
            },
        })
    }

    /// Position of the tunnel with id `id`.
    pub fn by_id(&self, id: u32) -> Option<usize> {
        self.gens.iter().position(|g| g.id == id)
    }

    /// Position of the tunnel for the pair (`mine`, `theirs`).
    pub fn by_keys(&self, mine: &PublicKey, theirs: &PublicKey) -> Option<usize> {
        self.gens
            .iter()
            .position(|g| g.mine == *mine && g.theirs == *theirs)
    }

    /// Whether `key` is (or recently was) this peer's.
    pub fn knows(&self, key: &PublicKey) -> bool {
        self.info.key == *key || self.gens.iter().any(|g| g.theirs == *key)
    }

    /// Removes tunnels that are done: older ones once the newest has sent
    /// for [`DRAIN`] (or their session expired), any without a session
    /// after [`ABANDON`], and those of identities this node no longer
    /// holds. Returns the tunnels removed (with what they still staged:
    /// packets that will never leave).
    pub fn retire(
        &mut self,
        mine: &PublicKey,
        held: &[PublicKey],
        now: Instant,
    ) -> Vec<Generation> {
        let newest = self.newest(mine);
        if let Some(n) = newest {
            let g = &mut self.gens[n];
            if g.live() {
                g.sending_since.get_or_insert(now);
            }
        }
        let drained = newest
            .and_then(|n| self.gens[n].sending_since)
            .is_some_and(|t| now.duration_since(t) >= DRAIN);
        let newest_id = newest.map(|n| self.gens[n].id);
        let (kept, gone) = std::mem::take(&mut self.gens).into_iter().partition(|g| {
            Some(g.id) == newest_id
                || (held.contains(&g.mine)
                    && !drained
                    && (g.live() || now.duration_since(g.created) < ABANDON))
        });
        self.gens = kept;
        gone
    }

    /// Packets its tunnels still stage.
    pub fn unsent(&self) -> usize {
        self.gens.iter().map(|g| g.staged.len()).sum()
    }
}

/// Every peer, by VTEP and by tunnel id.
#[derive(Default)]
pub struct Table {
    by_vtep: HashMap<Ipv4Addr, Arc<Mutex<Peer>>>,
    by_tunnel: HashMap<u32, Arc<Mutex<Peer>>>,
    next_id: u32,
}

/// What [`Table::set_peers`] changed.
pub struct PeersSet {
    /// Peers whose key changed while an older tunnel had a session: they
    /// should handshake on the new tunnel right away, so traffic moves to
    /// it.
    pub rekey: Vec<Arc<Mutex<Peer>>>,
    /// Packets the peers that left still staged: they will never leave.
    pub unsent: usize,
}

/// Tunnel ids are 24 bits (boringtun keeps the low 8 bits of a session
/// index for itself).
const ID_MASK: u32 = 0x00ff_ffff;

impl Table {
    /// The peer behind VTEP `vtep`.
    pub fn by_vtep(&self, vtep: Ipv4Addr) -> Option<Arc<Mutex<Peer>>> {
        self.by_vtep.get(&vtep).cloned()
    }

    /// The peer owning the session with receiver index `index`, and the
    /// tunnel id.
    pub fn by_index(&self, index: u32) -> Option<(Arc<Mutex<Peer>>, u32)> {
        let id = index >> 8;
        self.by_tunnel.get(&id).map(|p| (p.clone(), id))
    }

    /// Every peer.
    pub fn peers(&self) -> impl Iterator<Item = &Arc<Mutex<Peer>>> {
        self.by_vtep.values()
    }

    /// The peer that holds or held static key `key`.
    pub fn by_key(&self, key: &PublicKey) -> Option<Arc<Mutex<Peer>>> {
        self.by_vtep
            .values()
            .find(|p| p.lock().unwrap_or_else(|e| e.into_inner()).knows(key))
            .cloned()
    }

    fn allocate_id(&mut self) -> u32 {
        loop {
            self.next_id = (self.next_id + 1) & ID_MASK;
            if self.next_id != 0 && !self.by_tunnel.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Adds a tunnel for (`mine`, `theirs`) to `peer`, unless there is one;
    /// returns its position.
    pub fn ensure_generation(
        &mut self,
        peer: &Arc<Mutex<Peer>>,
        mine: &Identity,
        theirs: PublicKey,
        initiate_after: Instant,
    ) -> usize {
        let mut p = peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = p.by_keys(&mine.public_key(), &theirs) {
            return i;
        }
        let id = self.allocate_id();
        // The tunnel checks handshakes with its identity's limiter, the one
        // the engine checks initiations with before knowing the tunnel:
        // one budget per key, reset by the engine's timer thread.
        let tunn = Tunn::new(
            mine.secret().clone(),
            theirs.x25519(),
            None,
            None,
            id,
            Some(mine.limiter().clone()),
        );
        p.gens.push(Generation {
            id,
            mine: mine.public_key(),
            theirs,
            tunn,
            initiate_after,
            created: Instant::now(),
            sending_since: None,
            staged: Staged::default(),
        });
        self.by_tunnel.insert(id, peer.clone());
        p.gens.len() - 1
    }

    /// Makes the table hold exactly `peers`, each with a tunnel for this
    /// node's current identity and its current key.
    pub fn set_peers(&mut self, peers: &[PeerInfo], me: &Identity, now: Instant) -> PeersSet {
        let wanted: std::collections::BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.vtep).collect();
        let gone: Vec<Ipv4Addr> = self
            .by_vtep
            .keys()
            .filter(|v| !wanted.contains(v))
            .copied()
            .collect();
        let mut unsent = 0;
        for vtep in gone {
            if let Some(p) = self.by_vtep.remove(&vtep) {
                let p = p.lock().unwrap_or_else(|e| e.into_inner());
                unsent += p.unsent();
                for g in &p.gens {
                    self.by_tunnel.remove(&g.id);
                }
            }
        }
        let mut rekey = Vec::new();
        for info in peers {
            let peer = match self.by_vtep.get(&info.vtep) {
                Some(p) => {
                    let mut guard = p.lock().unwrap_or_else(|e| e.into_inner());
                    let changed = guard.info.key != info.key;
                    let had_session = guard.gens.iter().any(|g| g.live());
                    guard.info = info.clone();
                    drop(guard);
                    if changed && had_session {
                        rekey.push(p.clone());
                    }
                    p.clone()
                }
                None => {
                    let p = Arc::new(Mutex::new(Peer {
                        info: info.clone(),
                        gens: Vec::new(),
                    }));
                    self.by_vtep.insert(info.vtep, p.clone());
                    p
                }
            };
            self.ensure_generation(&peer, me, info.key, now);
        }
        PeersSet { rekey, unsent }
    }

    /// Packets every tunnel still stages.
    pub fn unsent(&self) -> usize {
        self.peers()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).unsent())
            .sum()
    }

    /// Forgets tunnel ids whose tunnels were retired.
    pub fn forget(&mut self, ids: &[u32]) {
        for id in ids {
            self.by_tunnel.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use boringtun::noise::TunnResult;

    use super::*;

    fn info(key: PublicKey) -> PeerInfo {
        PeerInfo {
            node: "b".into(),
            vtep: Ipv4Addr::new(198, 51, 100, 10),
            key,
            port: 51820,
            underlay_mtu: Some(1500),
        }
    }

    /// Runs a full handshake between tunnel `ia` of `a` and tunnel `ib` of
    /// `b`, `a` initiating.
    fn handshake(a: &mut Generation, b: &mut Generation) {
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let init = match a.tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        let resp = match b.tunn.decapsulate(None, &init, &mut out) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        let keepalive = match a.tunn.decapsulate(None, &resp, &mut out) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            b.tunn.decapsulate(None, &keepalive, &mut out),
            TunnResult::Done
        ));
    }

    #[test]
    fn newest_tunnel_sends_once_it_has_a_session_and_older_ones_carry_until_then() {
        let a1 = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let mut table = Table::default();
        let now = Instant::now();
        table.set_peers(&[info(b.public_key())], &a1, now);
        let peer = table.by_vtep(Ipv4Addr::new(198, 51, 100, 10)).unwrap();

        // b's side of the first pair.
        let mut b_side = Generation {
            id: 99,
            mine: b.public_key(),
            theirs: a1.public_key(),
            tunn: Tunn::new(b.secret().clone(), *a1.public(), None, None, 99, None),
            initiate_after: now,
            created: now,
            sending_since: None,
            staged: Staged::default(),
        };
        {
            let mut p = peer.lock().unwrap();
            let s = p.sender(&a1.public_key(), now).unwrap();
            assert_eq!((s.index, s.handshake_newest), (0, false));
            handshake(&mut p.gens[0], &mut b_side);
            assert!(p.gens[0].live());
        }

        // a rotates: a new pair appears; the old one keeps sending, and the
        // newest waits for the peer until initiate_after.
        let a2 = Identity::generate().unwrap();
        let later = now + Duration::from_secs(5);
        table.ensure_generation(&peer, &a2, b.public_key(), later);
        let mut p = peer.lock().unwrap();
        let s = p.sender(&a2.public_key(), now).unwrap();
        assert_eq!((s.index, s.handshake_newest), (0, false));
        let s = p.sender(&a2.public_key(), later).unwrap();
        assert_eq!((s.index, s.handshake_newest), (0, true));

        // b learns a2 and handshakes: the newest pair takes over.
        let mut b_new = Generation {
            id: 100,
            mine: b.public_key(),
            theirs: a2.public_key(),
            tunn: Tunn::new(b.secret().clone(), *a2.public(), None, None, 100, None),
            initiate_after: now,
            created: now,
            sending_since: None,
            staged: Staged::default(),
        };
        handshake(&mut b_new, &mut p.gens[1]);
        // The responder sends once the initiator's first message came.
        assert!(p.gens[1].live());
        let s = p.sender(&a2.public_key(), later).unwrap();
        assert_eq!((s.index, s.handshake_newest), (1, false));

        // The old pair drains, then goes; and only once a1 is let go early.
        let held = [a2.public_key(), a1.public_key()];
        assert!(p.retire(&a2.public_key(), &held, later).is_empty());
        assert_eq!(p.gens.len(), 2);
        let gone = p.retire(&a2.public_key(), &held, later + DRAIN);
        assert_eq!(gone.len(), 1);
        assert_eq!(p.gens.len(), 1);
        assert_eq!(p.gens[0].mine, a2.public_key());
    }

    #[test]
    fn packets_staged_on_a_tunnel_or_peer_that_goes_are_handed_back_to_be_counted() {
        let a = Identity::generate().unwrap();
        let (b1, b2) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let mut table = Table::default();
        let now = Instant::now();
        table.set_peers(&[info(b1.public_key())], &a, now);
        let peer = table.by_vtep(Ipv4Addr::new(198, 51, 100, 10)).unwrap();
        // Packets wait for b1's handshake, which never comes: b1 is gone,
        // its node now publishes b2.
        for _ in 0..3 {
            peer.lock().unwrap().gens[0].staged.push(&[0u8; 100], now);
        }
        let set = table.set_peers(&[info(b2.public_key())], &a, now);
        assert_eq!(set.unsent, 0, "the peer stays");
        assert_eq!(table.unsent(), 3);
        // The tunnel for b1 is abandoned: its packets come back with it.
        let gone =
            peer.lock()
                .unwrap()
                .retire(&a.public_key(), &[a.public_key()], now + ABANDON * 2);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].theirs, b1.public_key());
        assert_eq!(gone[0].staged.len(), 3);
        // Packets waiting for b2 when the peer leaves the cluster.
        peer.lock().unwrap().gens[0].staged.push(&[0u8; 100], now);
        assert_eq!(table.set_peers(&[], &a, now).unsent, 1);
        assert_eq!(table.unsent(), 0);
    }

    #[test]
    fn a_peer_whose_key_changed_with_a_live_session_is_asked_to_rekey() {
        let a = Identity::generate().unwrap();
        let b1 = Identity::generate().unwrap();
        let b2 = Identity::generate().unwrap();
        let mut table = Table::default();
        let now = Instant::now();
        assert!(
            table
                .set_peers(&[info(b1.public_key())], &a, now)
                .rekey
                .is_empty()
        );
        let peer = table.by_vtep(Ipv4Addr::new(198, 51, 100, 10)).unwrap();
        let mut b_side = Generation {
            id: 7,
            mine: b1.public_key(),
            theirs: a.public_key(),
            tunn: Tunn::new(b1.secret().clone(), *a.public(), None, None, 7, None),
            initiate_after: now,
            created: now,
            sending_since: None,
            staged: Staged::default(),
        };
        handshake(&mut peer.lock().unwrap().gens[0], &mut b_side);
        let rekey = table.set_peers(&[info(b2.public_key())], &a, now).rekey;
        assert_eq!(rekey.len(), 1);
        let p = peer.lock().unwrap();
        assert_eq!(p.gens.len(), 2);
        assert!(p.knows(&b1.public_key()) && p.knows(&b2.public_key()));
        drop(p);
        // Index lookups find the tunnel of each generation.
        let ids: Vec<u32> = peer.lock().unwrap().gens.iter().map(|g| g.id).collect();
        for id in ids {
            assert!(table.by_index(id << 8 | 3).is_some());
        }
        // A peer that leaves takes its tunnels with it.
        table.set_peers(&[], &a, now);
        assert!(table.by_vtep(Ipv4Addr::new(198, 51, 100, 10)).is_none());
        assert!(table.by_index(1 << 8).is_none());
    }
}
