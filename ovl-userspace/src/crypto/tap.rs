//! The crypto device: a TAP interface the agent owns. Encrypted networks'
//! VXLAN frames are redirected into it by the egress program and read here;
//! decrypted frames are written to it and meet the decap program at its TC
//! ingress. It exists only while the agent holds its descriptor.

use super::offload::VNET_HDR_LEN;
use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
};

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`; the flags by value).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` (`_IOW('T', 216, int)`).
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Every frame read or written starts with a virtio-net header.
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUN_F_*` (linux/if_tun.h): what the reader of the device can take.
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
/// GSO over UDP tunnels (Linux 6.17): needs the tunnel header size.
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x080;

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> io::Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} is not 1-15 bytes"),
            ));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(req)
    }

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn ioctl(fd: libc::c_int, request: libc::c_ulong, req: &mut IfReq, what: &str) -> io::Result<()> {
    // SAFETY: `req` is a properly sized `struct ifreq` the kernel may write.
    if unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// An open TAP device, up, without IPv6 (nothing but ovl's frames in it).
/// Every frame read and written starts with a virtio-net header of
/// [`VNET_HDR_LEN`] bytes.
pub struct Tap {
    file: File,
    name: String,
    ifindex: u32,
    mac: [u8; 6],
    tunnel_gso: bool,
}

impl Tap {
    /// Creates TAP `name` with `mtu` and brings it up. It goes away when
    /// the returned value (its only descriptor) is dropped or the process
    /// dies.
    pub fn create(name: &str, mtu: u32) -> io::Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
        let mut req = IfReq::named(name)?;
        req.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ioctl(
            file.as_raw_fd(),
            TUNSETIFF,
            &mut req,
            "create the TAP device",
        )?;
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("set the virtio-net header size: {e}"),
            ));
        }
        // TCP super-packets of the containers cross whole, with partial
        // checksums, as GSO over the VXLAN tunnel; a kernel without tunnel
        // GSO through TUN (before 6.17) segments and checksums them
        // itself, as before. IPv4 only: ovl's networks are IPv4.
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN | TUN_F_UDP_TUNNEL_GSO;
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let tunnel_gso =
            unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, offloads) } == 0;
        if !tunnel_gso {
            log::info!(
                "crypto device {name}: no GSO over UDP tunnels through TUN here (Linux < 6.17?): frames cross one by one"
            );
            // SAFETY: as above; zero asks for no offload.
            unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_uint) };
        }

        // Router solicitations and the like would only be noise here.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");

        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let fd = sock.as_raw_fd();

        let mut req = IfReq::named(name)?;
        req.set_int(mtu as libc::c_int);
        ioctl(fd, libc::SIOCSIFMTU, &mut req, "set the TAP MTU")?;

        let mut req = IfReq::named(name)?;
        ioctl(fd, libc::SIOCGIFFLAGS, &mut req, "read the TAP flags")?;
        let flags = req.short() | libc::IFF_UP as libc::c_short;
        req.set_short(flags);
        ioctl(fd, libc::SIOCSIFFLAGS, &mut req, "bring the TAP up")?;

        let mut req = IfReq::named(name)?;
        ioctl(fd, libc::SIOCGIFINDEX, &mut req, "read the TAP ifindex")?;
        let ifindex = req.int() as u32;

        let mut req = IfReq::named(name)?;
        ioctl(fd, libc::SIOCGIFHWADDR, &mut req, "read the TAP MAC")?;
        // struct sockaddr: family (2 bytes), then the address.
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&req.data[2..8]);

        Ok(Tap {
            file,
            name: name.to_owned(),
            ifindex,
            mac,
            tunnel_gso,
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Its MAC: the destination of the frames written to it.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether TCP super-packets cross the device whole (GSO over the
    /// VXLAN tunnel), both ways.
    pub fn tunnel_gso(&self) -> bool {
        self.tunnel_gso
    }

    /// The descriptor frames are read from and written to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Removes the device now, though this value lives on (others may
    /// still hold what owns it): its descriptor is made to name /dev/null
    /// instead, and the kernel removes a TAP whose last descriptor went.
    /// Nothing may read or write frames after this.
    pub fn release(&self) {
        match File::open("/dev/null") {
            // SAFETY: dup3 atomically makes our descriptor name another
            // open file; it stays ours and valid (closed when dropped).
            Ok(null) => unsafe {
                libc::dup3(null.as_raw_fd(), self.file.as_raw_fd(), libc::O_CLOEXEC);
            },
            Err(e) => log::debug!("crypto device {}: open /dev/null: {e}", self.name),
        }
    }
}
