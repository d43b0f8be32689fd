//! A raw image file (or block device) as a node.

use super::channel::{Engine, IoChannel, UringChannel};
use super::iov::iovecs_advance;
use super::{check_range, iov_len, BlockDev, BlockError, Extent, ExtentKind, Refusal, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::VolatileSlice;

/// How to open a [`RawFile`].
#[derive(Debug, Clone, Default)]
pub struct RawFileOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`). Misaligned requests fall back to
    /// an aligned bounce buffer.
    pub direct: bool,
    /// Create a sparse file of this size when the path does not exist; extend a
    /// shorter regular file to it.
    pub create_size: Option<u64>,
    /// Synchronous or io_uring (see [`Engine`] for the rule).
    pub engine: Engine,
}

/// A raw image: byte `n` of the device is byte `n` of the file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    /// Shared with every clone (the io_uring channels), so that a
    /// [`grow`](BlockDev::grow) reaches the channels already open.
    size: Arc<AtomicU64>,
    read_only: bool,
    direct: bool,
    engine: Engine,
}

/// Alignment O_DIRECT needs for buffers, offsets and lengths on the devices we
/// serve (4096 also covers 512-byte sector devices).
const DIRECT_ALIGN: usize = 4096;

/// At most this many iovecs per preadv/pwritev call (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// `offset` as the kernel's `off_t`; offsets past `i64::MAX` (never within a
/// device, whose ranges are checked first) fail with `EOVERFLOW`.
fn off_t(op: &'static str, offset: u64) -> Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| BlockError::io(op, offset, io::Error::from_raw_os_error(libc::EOVERFLOW)))
}

impl RawFile {
    /// A writable image of `size` bytes at `path` through the page cache,
    /// created sparse if it does not exist (as [`Overlay::create`] does for an
    /// overlay): [`RawFile::open`] with only `create_size` set.
    ///
    /// [`Overlay::create`]: super::Overlay::create
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let opts = RawFileOptions {
            create_size: Some(size),
            ..RawFileOptions::default()
        };
        Self::open(path, &opts)
    }

    /// Opens (or creates) the image at `path`.
    pub fn open(path: &Path, opts: &RawFileOptions) -> io::Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.create_size.is_some() && !opts.read_only {
            oo.create(true);
        }
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let meta = file.metadata()?;
        let mut size = if meta.is_file() {
            meta.len()
        } else {
            device_size(&file)?
        };
        if let Some(want) = opts.create_size {
            if meta.is_file() && size < want && !opts.read_only {
                file.set_len(want)?;
                size = want;
            }
        }
        Ok(RawFile {
            file,
            size: Arc::new(AtomicU64::new(size)),
            read_only: opts.read_only,
            direct: opts.direct,
            engine: opts.engine,
        })
    }

    /// Wraps an already open file; its current length is the device size.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(RawFile {
            file,
            size: Arc::new(AtomicU64::new(size)),
            read_only,
            direct: false,
            engine: Engine::Sync,
        })
    }

    /// Chooses the I/O engine for channels opened on this file.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// Alignment O_DIRECT needs for buffers, offsets and lengths.
    pub const DIRECT_ALIGN: usize = DIRECT_ALIGN;

    /// True when the file bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// A second handle on the same open file (a dup of its descriptor) with the
    /// same flags, sharing the size (a later grow applies to both).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(RawFile {
            file: self.file.try_clone()?,
            size: Arc::clone(&self.size),
            read_only: self.read_only,
            direct: self.direct,
            engine: self.engine,
        })
    }

    fn needs_bounce(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> bool {
        self.direct
            && (offset % DIRECT_ALIGN as u64 != 0
                || bufs.iter().any(|b| {
                    b.len() % DIRECT_ALIGN != 0
                        || b.ptr_guard().as_ptr() as usize % DIRECT_ALIGN != 0
                }))
    }

    fn fallocate(&self, op: &'static str, mode: i32, offset: u64, len: u64) -> Result<()> {
        let (at, n) = (off_t(op, offset)?, off_t(op, len)?);
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, at, n) };
        if rc == 0 {
            Ok(())
        } else {
            Err(BlockError::io(op, offset, io::Error::last_os_error()))
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut zeros = AlignedBuf::new(CHUNK.min(len) as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            let slice = VolatileSlice::from(&mut zeros.as_mut_slice()[..n]);
            self.rw(Dir::Write, offset + done, &[slice])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Moves all bytes of `bufs`, looping over short transfers and EINTR.
    fn rw(&self, dir: Dir, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let op = dir.name();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.ptr_guard_mut().as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0;
        let mut pos = offset;
        while first < iovs.len() {
            let batch = &iovs[first..iovs.len().min(first + IOV_MAX)];
            // At most IOV_MAX (1024): always fits.
            let count = libc::c_int::try_from(batch.len()).unwrap_or(libc::c_int::MAX);
            let at = off_t(op, pos)?;
            // SAFETY: every iovec points into a VolatileSlice the caller lent us for
            // this call, of the stated length; the fd is owned by self.
            let n = unsafe {
                match dir {
                    Dir::Read => libc::preadv(self.file.as_raw_fd(), batch.as_ptr(), count, at),
                    Dir::Write => libc::pwritev(self.file.as_raw_fd(), batch.as_ptr(), count, at),
                }
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BlockError::io(op, pos, err));
            }
            if n == 0 {
                match dir {
                    // Past the end of a shorter file (or a shrunk device): zeroes.
                    Dir::Read => {
                        for iov in &iovs[first..] {
                            // SAFETY: as above, the iovec lies in a caller's buffer.
                            unsafe {
                                std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len)
                            };
                        }
                        return Ok(());
                    }
                    Dir::Write => {
                        return Err(BlockError::io(op, pos, io::ErrorKind::WriteZero.into()))
                    }
                }
            }
            pos += n as u64;
            first = iovecs_advance(&mut iovs, first, n as usize);
        }
        Ok(())
    }

    /// O_DIRECT with misaligned guest buffers: go through one aligned buffer that
    /// covers the whole aligned range (read-modify-write for writes).
    fn rw_bounced(&self, dir: Dir, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        let align = DIRECT_ALIGN as u64;
        let start = offset / align * align;
        let end = (offset + len).div_ceil(align) * align;
        let mut bounce = AlignedBuf::new((end - start) as usize);
        let head = (offset - start) as usize;
        let needs_read = dir == Dir::Read || start != offset || end != offset + len;
        if needs_read {
            let slice = VolatileSlice::from(bounce.as_mut_slice());
            self.rw(Dir::Read, start, &[slice])?;
        }
        let mut at = head;
        for b in bufs {
            let window = &mut bounce.as_mut_slice()[at..at + b.len()];
            match dir {
                Dir::Read => b.copy_from(window),
                Dir::Write => {
                    b.copy_to(window);
                }
            }
            at += b.len();
        }
        if dir == Dir::Write {
            let slice = VolatileSlice::from(bounce.as_mut_slice());
            self.rw(Dir::Write, start, &[slice])?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

impl AsRawFd for RawFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl BlockDev for RawFile {
    fn size(&self) -> u64 {
        // Acquire pairs with grow's store: the file is long enough for any
        // size read here.
        self.size.load(Ordering::Acquire)
    }

    fn grow(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let old = self.size();
        if new_size <= old {
            return Ok(());
        }
        let meta = self
            .file
            .metadata()
            .map_err(|e| BlockError::io("grow", old, e))?;
        if meta.is_file() {
            // Sparse, as QEMU's block_resize extends a raw file
            // (preallocation off). Only ever longer: a file already longer
            // than the old size (a trailing partial block) keeps its bytes.
            if meta.len() < new_size {
                self.file
                    .set_len(new_size)
                    .map_err(|e| BlockError::io("grow", old, e))?;
            }
            // The new length is durable before the guest is told of it: a
            // crash must not bring back a disk shorter than what it wrote to.
            self.file
                .sync_all()
                .map_err(|e| BlockError::io("grow", old, e))?;
        } else {
            // A block device is grown by its owner (lvextend, a resized LUN);
            // colo-blk only starts serving what it already holds.
            let held = device_size(&self.file).map_err(|e| BlockError::io("grow", old, e))?;
            if held < new_size {
                return Err(BlockError::Refused(Refusal::DeviceTooSmall {
                    held,
                    wanted: new_size,
                }));
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn open_channel(&self, depth: u32) -> Option<io::Result<Box<dyn IoChannel>>> {
        if !self.engine.uses_uring(self.direct) {
            return None;
        }
        Some(
            self.try_clone()
                .and_then(|f| UringChannel::new(f, depth))
                .map(|c| Box::new(c) as Box<dyn IoChannel>),
        )
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        check_range(offset, iov_len(bufs), self.size())?;
        if self.needs_bounce(offset, bufs) {
            return self.rw_bounced(Dir::Read, offset, bufs);
        }
        self.rw(Dir::Read, offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, iov_len(bufs), self.size())?;
        if self.needs_bounce(offset, bufs) {
            return self.rw_bounced(Dir::Write, offset, bufs);
        }
        self.rw(Dir::Write, offset, bufs)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| BlockError::io("flush", 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate("write-zeroes", mode, offset, len) {
            Ok(()) => Ok(()),
            Err(BlockError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL)
                ) =>
            {
                // The filesystem cannot punch or zero ranges: write the zeroes.
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(e),
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        let fd = self.file.as_raw_fd();
        let end = offset + len;
        let at = off_t("block-status", offset)?;
        // SAFETY: lseek only reads its integer arguments.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data at or after offset: the rest of the file is a hole.
                Some(libc::ENXIO) => Ok(Extent {
                    len,
                    kind: ExtentKind::Hole,
                }),
                // SEEK_DATA unsupported (block device, old fs): report data.
                _ => Ok(Extent {
                    len,
                    kind: ExtentKind::Data,
                }),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok(Extent {
                len: data.min(end) - offset,
                kind: ExtentKind::Hole,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, at, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        Ok(Extent {
            len: hole.max(offset + 1).min(end) - offset,
            kind: ExtentKind::Data,
        })
    }
}

/// Size of a block device (or anything seekable) from its end offset.
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size (at least one alignment unit).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("aligned layout of a request-sized buffer")
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of at least len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in new() with this exact layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.len)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockDevExt;

    fn image(size: u64) -> (tempfile::TempDir, RawFile) {
        let dir = tempfile::tempdir().unwrap();
        let dev = RawFile::create(&dir.path().join("img"), size).unwrap();
        (dir, dev)
    }

    #[test]
    fn vectored_write_reads_back_across_buffers() {
        let (_d, dev) = image(1 << 20);
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 3584];
        dev.write_vectored(
            4096,
            &[
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ],
        )
        .unwrap();
        let mut out = vec![0u8; 4096];
        dev.read_at(4096, &mut out).unwrap();
        assert!(out[..512].iter().all(|&x| x == 1));
        assert!(out[512..].iter().all(|&x| x == 2));
    }

    #[test]
    fn out_of_range_is_refused_not_written() {
        let (_d, dev) = image(8192);
        let err = dev.write_at(8192 - 512, &[0u8; 1024]).unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }));
        assert!(matches!(
            dev.read_at(u64::MAX - 10, &mut [0u8; 512]),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn write_zeroes_and_discard_read_zero_and_report_holes() {
        let (_d, dev) = image(1 << 20);
        dev.write_at(0, &vec![7u8; 1 << 20]).unwrap();
        dev.write_zeroes(65536, 65536, false).unwrap();
        dev.discard(262144, 65536).unwrap();
        let mut out = vec![9u8; 65536];
        dev.read_at(65536, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        dev.read_at(262144, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        let ext = dev.block_status(262144, 1 << 19).unwrap();
        assert_eq!(ext.kind, ExtentKind::Hole);
        assert_eq!(ext.len, 65536);
        assert_eq!(dev.block_status(0, 4096).unwrap().kind, ExtentKind::Data);
    }

    #[test]
    fn grow_extends_the_file_and_the_range_of_every_clone() {
        let (d, dev) = image(8192);
        let clone = dev.try_clone().unwrap();
        assert!(matches!(
            clone.write_at(8192, &[1u8; 512]),
            Err(BlockError::OutOfRange { .. })
        ));
        dev.grow(16384).unwrap();
        let len = std::fs::metadata(d.path().join("img")).unwrap().len();
        assert_eq!((len, dev.size(), clone.size()), (16384, 16384, 16384));
        clone.write_at(16384 - 512, &[1u8; 512]).unwrap();
        let mut out = [0u8; 512];
        dev.read_at(16384 - 512, &mut out).unwrap();
        assert_eq!(out, [1u8; 512]);
        // Never shrinks.
        dev.grow(4096).unwrap();
        assert_eq!(dev.size(), 16384);
        assert_eq!(
            std::fs::metadata(d.path().join("img")).unwrap().len(),
            16384
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let (d, dev) = image(4096);
        drop(dev);
        let ro = RawFile::open(
            &d.path().join("img"),
            &RawFileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            ro.write_at(0, &[1u8; 512]),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(ro.discard(0, 512), Err(BlockError::ReadOnly)));
        assert!(matches!(ro.grow(8192), Err(BlockError::ReadOnly)));
    }
}
