//! Bounds-checked access to packet bytes, shared by the XDP and TC
//! programs. Every header read or write in ovl goes through `Frame`.

use core::mem;

use aya_ebpf::programs::{TcContext, XdpContext};
use ovl_common::DropReason;

/// The linear bytes of a packet: `[start, end)` as the verifier knows them.
#[derive(Clone, Copy)]
pub struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    /// The frame of an XDP packet.
    #[inline(always)]
    pub fn of_xdp(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// The linear part of a socket buffer. Re-take it after every helper
    /// that may move packet data (pull, adjust_room): the verifier
    /// invalidates older pointers.
    #[inline(always)]
    pub fn of_skb(ctx: &TcContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// The linear part of a socket buffer whose first `hdr_len` bytes (or
    /// all of them, when it is shorter) are in it: pulled there only when
    /// they are not yet, so most frames skip the helper call.
    #[inline(always)]
    pub fn of_skb_headers(ctx: &TcContext, hdr_len: u32) -> Self {
        let want = ctx.len().min(hdr_len) as usize;
        if ctx.data_end() - ctx.data() < want {
            let _ = ctx.pull_data(want as u32);
        }
        Self::of_skb(ctx)
    }

    /// A pointer to a `T` at `offset`, if all of it lies inside the frame.
    /// The check is written as the verifier wants it: pointer + size
    /// compared against the end.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, DropReason> {
        let at = self.start + offset;
        if at + mem::size_of::<T>() > self.end {
            return Err(DropReason::Malformed);
        }
        Ok(at as *mut T)
    }

    /// A copy of the `T` at `offset`.
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Result<T, DropReason> {
        // SAFETY: ptr_at checked that the whole T is inside the packet;
        // read_unaligned because headers are not aligned in packet memory.
        Ok(unsafe { self.ptr_at::<T>(offset)?.read_unaligned() })
    }

    /// Writes `value` at `offset`.
    #[inline(always)]
    pub fn write<T: Copy>(&self, offset: usize, value: T) -> Result<(), DropReason> {
        // SAFETY: as in `read`.
        unsafe { self.ptr_at::<T>(offset)?.write_unaligned(value) };
        Ok(())
    }
}
