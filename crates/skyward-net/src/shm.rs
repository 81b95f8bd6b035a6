//! Large arguments through shared memory between processes of one machine.
//!
//! A node on the coordinator's machine (the Local provider) does not need a 256 MiB argument sent
//! through QUIC, its worker and its executor socket: the coordinator writes it once into a memfd,
//! seals it (no process can change, grow or shrink it any more), and sends each task a
//! [`SharedMemory`] reference. The executor opens `/proc/<pid>/fd/<fd>`, checks the seals, the
//! inode and the length, and maps it read-only. A broadcast to four local nodes then writes the
//! argument once, whatever the number of nodes, and no byte of it crosses a socket.
//!
//! Nothing can leak: a memfd has no name in any file system and is freed when the last process
//! closes or unmaps it (the coordinator closes it once no task needs it; a coordinator that dies
//! closes it with its other files).
//!
//! Whether a worker can be handed such references is proven, not guessed: each worker keeps a
//! [`Probe`] (a sealed memfd holding a random token) and reports it in its facts; the coordinator
//! uses shared memory for that worker only when [`Probe::matches`] opens it and reads the token
//! (same machine, same PID namespace, same user, both processes dumpable).

use bytes::Bytes;
use skyward_proto::message::{MemoryProbe, SharedMemory};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Seals every object carries before it is referenced: no writes, no resizing, no more seals.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;

/// A sealed, read-only shared-memory object of this process. Dropping it closes the descriptor;
/// the memory goes with the last mapping of it.
#[derive(Debug)]
pub struct Sealed {
    /// Open for as long as a task may be handed `at`: closing it frees the memory once no
    /// mapping is left, and a later open of `at` fails.
    _file: File,
    at: SharedMemory,
}

impl Sealed {
    /// A new object holding `data` (`name` shows in `/proc/<pid>/fd` listings).
    pub fn new(name: &str, data: &[u8]) -> std::io::Result<Self> {
        let name = std::ffi::CString::new(name).map_err(|_| std::io::Error::other("memfd name contains a NUL byte"))?;
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid for memfd_create.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(data)?;
        // SAFETY: F_ADD_SEALS on a descriptor this function owns; no pointers involved.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let inode = file.metadata()?.ino();
        let at = SharedMemory { pid: std::process::id(), fd: file.as_raw_fd(), inode, len: data.len() as u64 };
        Ok(Self { _file: file, at })
    }

    /// The reference another process of this machine opens it by.
    pub fn at(&self) -> SharedMemory {
        self.at
    }
}

/// Open the object `at` refers to, checked: sealed against change, the inode and the length it
/// was announced with (a descriptor number the owner closed and reused is refused).
fn open_checked(at: &SharedMemory) -> std::io::Result<File> {
    let path = format!("/proc/{}/fd/{}", at.pid, at.fd);
    let file = File::open(&path).map_err(|e| std::io::Error::new(e.kind(), format!("cannot open shared memory {path}: {e}")))?;
    // SAFETY: F_GET_SEALS on a descriptor owned by `file`; no pointers involved.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Err(std::io::Error::other(format!("shared memory {path} is not sealed against change")));
    }
    let meta = file.metadata()?;
    if meta.ino() != at.inode || meta.len() != at.len {
        return Err(std::io::Error::other(format!(
            "shared memory {path} is another object (inode {}, {} bytes; expected inode {}, {} bytes)",
            meta.ino(),
            meta.len(),
            at.inode,
            at.len
        )));
    }
    Ok(file)
}

/// A read-only mapping, unmapped on drop.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and of a sealed object (no process can write to it), so the
// bytes never change while it exists; any thread may read them and unmap them on drop.
unsafe impl Send for Mapping {}
// SAFETY: as above: shared reads of immutable memory.
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes (see `map`), sealed against
        // writes and truncation, valid until `drop` unmaps it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows the slice any more
        // (`Bytes` drops its owner only after its last clone).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The bytes of the object `at` refers to, mapped read-only (no copy; pages are mapped up front so
/// that readers take no page fault per page).
pub fn map(at: &SharedMemory) -> std::io::Result<Bytes> {
    let file = open_checked(at)?;
    let len = usize::try_from(at.len).map_err(|_| std::io::Error::other("shared memory larger than the address space"))?;
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: a new read-only shared mapping of `len` bytes of an open file at offset 0; the
    // kernel picks the address. The file is sealed (checked above), so it cannot shrink below
    // `len` (no SIGBUS) and its bytes cannot change under the slice.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_POPULATE, file.as_raw_fd(), 0) };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let ptr = std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
    Ok(Bytes::from_owner(Mapping { ptr, len }))
}

/// A worker's proof of locality: a sealed object holding a random token.
#[derive(Debug)]
pub struct Probe {
    _object: Sealed,
    probe: MemoryProbe,
}

impl Probe {
    /// A new probe for this process.
    pub fn new() -> std::io::Result<Self> {
        let token = crate::random_token()?;
        let object = Sealed::new("skyward-probe", &token)?;
        let probe = MemoryProbe { at: object.at(), token };
        Ok(Self { _object: object, probe })
    }

    /// What the worker reports.
    pub fn probe(&self) -> &MemoryProbe {
        &self.probe
    }

    /// Whether this process can hand `probe`'s owner shared memory: it can open the probe and
    /// reads its token, the owner runs as this process's user, and this process may be opened by
    /// it (dumpable). Any failure is a plain no.
    pub fn matches(probe: &MemoryProbe) -> bool {
        let Ok(mut file) = open_checked(&probe.at) else { return false };
        let mut token = [0u8; 16];
        if file.read_exact(&mut token).is_err() || token != probe.token {
            return false;
        }
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let owner = std::fs::metadata(format!("/proc/{}", probe.at.pid)).map(|m| m.uid());
        // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) } == 1;
        owner.is_ok_and(|o| o == uid) && dumpable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_objects_map_with_their_bytes_and_refuse_change() {
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        let object = Sealed::new("skyward-test", &data).expect("memfd");
        let bytes = map(&object.at()).expect("map");
        assert_eq!(&bytes[..], &data[..]);
        // The mapping outlives the owner's descriptor.
        drop(object);
        assert_eq!(bytes.len(), data.len());
        assert_eq!(bytes[4096], data[4096]);
        // Sealed: a writable open or a write through the proc link fails.
        let object = Sealed::new("skyward-test", b"abc").expect("memfd");
        let path = format!("/proc/{}/fd/{}", object.at().pid, object.at().fd);
        let written = std::fs::OpenOptions::new().write(true).open(&path).and_then(|mut f| f.write_all(b"x"));
        assert!(written.is_err(), "a sealed object took a write");
        assert_eq!(&map(&object.at()).expect("map")[..], b"abc");
    }

    #[test]
    fn a_reference_to_another_object_is_refused() {
        let a = Sealed::new("skyward-test", b"first").expect("memfd");
        let b = Sealed::new("skyward-test", b"other").expect("memfd");
        // The descriptor of one object with the identity of another (a reused number).
        let wrong = SharedMemory { fd: b.at().fd, ..a.at() };
        let err = map(&wrong).expect_err("another object");
        assert!(err.to_string().contains("another object"), "{err}");
        let wrong_len = SharedMemory { len: 4, ..a.at() };
        assert!(map(&wrong_len).is_err());
        // A descriptor that is no memfd (not sealed) is refused.
        let plain = File::open("/proc/self/status").expect("open");
        let meta = plain.metadata().expect("meta");
        let unsealed = SharedMemory { pid: std::process::id(), fd: plain.as_raw_fd(), inode: meta.ino(), len: meta.len() };
        assert!(map(&unsealed).is_err());
        let empty = Sealed::new("skyward-test", b"").expect("memfd");
        assert!(map(&empty.at()).expect("map").is_empty());
    }

    #[test]
    fn probes_match_only_with_their_token() {
        let probe = Probe::new().expect("probe");
        assert!(Probe::matches(probe.probe()));
        let mut forged = probe.probe().clone();
        forged.token[0] ^= 1;
        assert!(!Probe::matches(&forged), "a wrong token matched");
        let gone = MemoryProbe { at: SharedMemory { pid: u32::MAX - 1, ..probe.probe().at }, token: probe.probe().token };
        assert!(!Probe::matches(&gone), "a probe of no process matched");
    }
}
