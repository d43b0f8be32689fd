//! A shared mapping of the inflight buffer, read and written with atomic accesses
//! only: the frontend maps the same pages, and whatever a backend stored there
//! before it was killed must be what its successor reads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8};

/// `len` bytes of a file, mapped shared and writable.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from `offset` (which mmap wants page aligned).
    pub(super) fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping chosen by the kernel; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// The byte at `off`. Offsets come from the buffer's layout, never from guest
    /// or frontend input, so one out of range is a bug here.
    pub(super) fn u8_at(&self, off: usize) -> &AtomicU8 {
        assert!(off < self.len, "inflight offset {off} outside {}", self.len);
        // SAFETY: in bounds (checked), any address is aligned for u8, and the
        // mapping lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU8>() }
    }

    /// The u16 at `off` (2-byte aligned by the layout).
    // The alignment the cast needs is checked first, at run time.
    #[allow(clippy::cast_ptr_alignment)]
    pub(super) fn u16_at(&self, off: usize) -> &AtomicU16 {
        assert!(off + 2 <= self.len && off % 2 == 0, "inflight u16 at {off}");
        // SAFETY: in bounds and aligned (checked; the mapping is page aligned),
        // the mapping lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU16>() }
    }

    /// The u64 at `off` (8-byte aligned by the layout).
    // The alignment the cast needs is checked first, at run time.
    #[allow(clippy::cast_ptr_alignment)]
    pub(super) fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off % 8 == 0, "inflight u64 at {off}");
        // SAFETY: as for u16_at.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; no reference into
        // the mapping outlives `self` (they all borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
