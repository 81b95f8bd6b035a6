//! ELF inspection: tell, before uploading a binary, whether it can run on a node at all.
//!
//! A hand-written reader of the few ELF fields that matter (class, byte order, machine, type and
//! the `PT_INTERP` program header) gives the binary's architecture and the C library it needs
//! ([`BinaryFacts`]); [`check_compatible`] compares them with what a worker reports (its
//! `std::env::consts::ARCH` and `glibc`, `musl` or `none`) and explains a mismatch in words a user
//! can act on. Nothing here panics on malformed input: every defect is an [`ElfError`].

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What a binary needs from the machine that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BinaryFacts {
    /// Architecture, named as [`std::env::consts::ARCH`] names it: `x86_64`, `aarch64`, `x86`,
    /// `arm`, `riscv64`, `powerpc64`, `s390x`, ... (byte order is not part of the name, as in
    /// `ARCH`).
    pub arch: String,
    /// The C library (really: the program interpreter) the binary is linked against.
    pub libc: Libc,
}

impl fmt::Display for BinaryFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.arch, self.libc)
    }
}

/// The C library a binary needs, as told by its program interpreter (`PT_INTERP`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Libc {
    /// Dynamically linked against glibc (interpreter `ld-linux*` or `ld64.so*`).
    Glibc,
    /// Dynamically linked against musl (interpreter `ld-musl*`).
    Musl,
    /// No interpreter: statically linked (or static-pie); runs on any Linux of its architecture.
    Static,
    /// Some other interpreter, by path (for instance Android's `/system/bin/linker64`).
    Other(String),
}

impl fmt::Display for Libc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Libc::Glibc => f.write_str("glibc"),
            Libc::Musl => f.write_str("musl"),
            Libc::Static => f.write_str("static"),
            Libc::Other(interpreter) => write!(f, "interpreter {interpreter}"),
        }
    }
}

/// Why a file could not be inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElfError {
    /// The file could not be opened or read.
    #[error("could not read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// Not an ELF file at all.
    #[error("not a Linux (ELF) executable: this looks like {detected}")]
    NotElf {
        /// What the file looks like instead, e.g. `"a Mach-O binary (macOS)"`.
        detected: &'static str,
    },
    /// The file ends before a structure the headers point to.
    #[error("truncated ELF file: the {what} lies past the end of the file")]
    Truncated {
        /// The structure that is missing.
        what: &'static str,
    },
    /// A header field holds a value no valid ELF file has.
    #[error("malformed ELF file: {what}")]
    Malformed {
        /// What is wrong.
        what: String,
    },
    /// An ELF file, but not something that can be executed (an object file or a core dump).
    #[error("ELF file is {kind}, not an executable")]
    NotExecutable {
        /// What it is.
        kind: &'static str,
    },
    /// An executable for a machine this crate does not know (the raw `e_machine`).
    #[error("ELF executable for an unknown machine (e_machine = {machine})")]
    UnknownMachine {
        /// The `e_machine` field.
        machine: u16,
    },
}

/// Most bytes [`inspect_file`] reads for the program header table.
const MAX_PROGRAM_HEADERS_BYTES: u64 = 256 * 1024;
/// Most bytes of an interpreter path (`PATH_MAX`).
const MAX_INTERP_BYTES: u64 = 4096;

const PT_INTERP: u32 = 3;
const PN_XNUM: u16 = 0xffff;

/// Read the architecture and C library of an ELF executable held in memory.
pub fn inspect(bytes: &[u8]) -> Result<BinaryFacts, ElfError> {
    parse(&mut SliceSource(bytes))
}

/// Read the architecture and C library of an ELF executable on disk.
///
/// Reads only the ELF header, the program header table and the interpreter path (a few KB in
/// practice, at most about 260 KB), never the whole file.
pub fn inspect_file(path: &Path) -> Result<BinaryFacts, ElfError> {
    let io_error = |source| ElfError::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    parse(&mut FileSource { file, len, path })
}

/// Random access to the bytes of the file being inspected.
trait Source {
    /// Up to `len` bytes at `offset`: fewer only where the file ends first.
    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ElfError>;

    /// Exactly `len` bytes at `offset`, or [`ElfError::Truncated`].
    fn read_exact_at(&mut self, offset: u64, len: usize, what: &'static str) -> Result<Vec<u8>, ElfError> {
        let bytes = self.read_at(offset, len)?;
        if bytes.len() < len {
            return Err(ElfError::Truncated { what });
        }
        Ok(bytes)
    }
}

struct SliceSource<'a>(&'a [u8]);

impl Source for SliceSource<'_> {
    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ElfError> {
        let Ok(start) = usize::try_from(offset) else { return Ok(Vec::new()) };
        let Some(rest) = self.0.get(start..) else { return Ok(Vec::new()) };
        Ok(rest[..len.min(rest.len())].to_vec())
    }
}

struct FileSource<'a> {
    file: std::fs::File,
    len: u64,
    path: &'a Path,
}

impl Source for FileSource<'_> {
    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ElfError> {
        let io_error = |source| ElfError::Io { path: self.path.to_owned(), source };
        if offset >= self.len {
            return Ok(Vec::new());
        }
        self.file.seek(SeekFrom::Start(offset)).map_err(io_error)?;
        let mut bytes = Vec::with_capacity(len);
        (&mut self.file).take(len as u64).read_to_end(&mut bytes).map_err(io_error)?;
        Ok(bytes)
    }
}

/// Byte order and word size of the file, to decode its fields.
#[derive(Clone, Copy)]
struct Layout {
    is_64: bool,
    big_endian: bool,
}

impl Layout {
    fn u16(self, bytes: &[u8], at: usize) -> u16 {
        let b = [bytes[at], bytes[at + 1]];
        if self.big_endian { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) }
    }

    fn u32(self, bytes: &[u8], at: usize) -> u32 {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if self.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
    }

    fn u64(self, bytes: &[u8], at: usize) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        if self.big_endian { u64::from_be_bytes(b) } else { u64::from_le_bytes(b) }
    }

    /// An address-sized field: 4 bytes in 32-bit files, 8 in 64-bit ones.
    fn word(self, bytes: &[u8], at32: usize, at64: usize) -> u64 {
        if self.is_64 { self.u64(bytes, at64) } else { u64::from(self.u32(bytes, at32)) }
    }
}

fn parse(source: &mut dyn Source) -> Result<BinaryFacts, ElfError> {
    let header = source.read_at(0, 64)?;
    if !header.starts_with(b"\x7fELF") {
        return Err(ElfError::NotElf { detected: detect(&header) });
    }
    if header.len() < 16 {
        return Err(ElfError::Truncated { what: "ELF identification" });
    }
    let is_64 = match header[4] {
        1 => false,
        2 => true,
        class => return Err(malformed(format!("unknown class {class} (expected 1 for 32-bit or 2 for 64-bit)"))),
    };
    let big_endian = match header[5] {
        1 => false,
        2 => true,
        data => return Err(malformed(format!("unknown byte order {data} (expected 1 or 2)"))),
    };
    let layout = Layout { is_64, big_endian };
    let header_size = if is_64 { 64 } else { 52 };
    if header.len() < header_size {
        return Err(ElfError::Truncated { what: "ELF header" });
    }

    match layout.u16(&header, 16) {
        2 | 3 => {} // ET_EXEC, ET_DYN (PIE executables, static-pie, shared objects)
        0 => return Err(ElfError::NotExecutable { kind: "of no type (ET_NONE)" }),
        1 => return Err(ElfError::NotExecutable { kind: "a relocatable object file (.o)" }),
        4 => return Err(ElfError::NotExecutable { kind: "a core dump" }),
        _ => return Err(ElfError::NotExecutable { kind: "of an unknown type" }),
    }
    let machine = layout.u16(&header, 18);
    let arch = arch_name(machine, is_64).ok_or(ElfError::UnknownMachine { machine })?;

    let phoff = layout.word(&header, 28, 32);
    let phentsize = layout.u16(&header, if is_64 { 54 } else { 42 });
    let mut phnum = u32::from(layout.u16(&header, if is_64 { 56 } else { 44 }));
    if phnum == u32::from(PN_XNUM) {
        // Too many program headers for e_phnum: the count is in sh_info of section header 0.
        let shoff = layout.word(&header, 32, 40);
        let entry = source.read_exact_at(shoff, if is_64 { 64 } else { 40 }, "first section header")?;
        phnum = layout.u32(&entry, if is_64 { 44 } else { 28 });
    }

    let min_entry: u16 = if is_64 { 56 } else { 32 };
    let mut interpreter = None;
    if phnum > 0 {
        if phentsize < min_entry {
            return Err(malformed(format!("program header entries of {phentsize} bytes (at least {min_entry} expected)")));
        }
        let table_len = u64::from(phnum) * u64::from(phentsize);
        if table_len > MAX_PROGRAM_HEADERS_BYTES {
            return Err(malformed(format!("program header table of {table_len} bytes")));
        }
        let table = source.read_exact_at(phoff, table_len as usize, "program header table")?;
        for entry in table.chunks_exact(usize::from(phentsize)) {
            if layout.u32(entry, 0) != PT_INTERP {
                continue;
            }
            let offset = layout.word(entry, 4, 8);
            let size = layout.word(entry, 16, 32);
            if size > MAX_INTERP_BYTES {
                return Err(malformed(format!("interpreter path of {size} bytes")));
            }
            let bytes = source.read_exact_at(offset, size as usize, "interpreter path")?;
            let path = bytes.split(|&b| b == 0).next().unwrap_or_default();
            interpreter = Some(String::from_utf8_lossy(path).into_owned());
            break;
        }
    }

    let libc = match interpreter {
        None => Libc::Static,
        Some(path) => classify_interpreter(path),
    };
    Ok(BinaryFacts { arch: arch.to_owned(), libc })
}

fn malformed(what: String) -> ElfError {
    ElfError::Malformed { what }
}

/// The `std::env::consts::ARCH` name of an ELF `e_machine`.
fn arch_name(machine: u16, is_64: bool) -> Option<&'static str> {
    Some(match (machine, is_64) {
        (3, _) => "x86",                  // EM_386
        (62, _) => "x86_64",              // EM_X86_64
        (40, _) => "arm",                 // EM_ARM
        (183, _) => "aarch64",            // EM_AARCH64
        (243, true) => "riscv64",         // EM_RISCV
        (243, false) => "riscv32",        //
        (20, _) => "powerpc",             // EM_PPC
        (21, _) => "powerpc64",           // EM_PPC64
        (22, true) => "s390x",            // EM_S390
        (8, true) => "mips64",            // EM_MIPS
        (8, false) => "mips",             //
        (2 | 18 | 43, true) => "sparc64", // EM_SPARC, EM_SPARC32PLUS, EM_SPARCV9
        (2 | 18, false) => "sparc",       //
        (258, _) => "loongarch64",        // EM_LOONGARCH
        _ => return None,
    })
}

/// Glibc, musl or something else, from the path of the program interpreter.
fn classify_interpreter(path: String) -> Libc {
    let name = path.rsplit('/').next().unwrap_or_default();
    if name.starts_with("ld-musl") {
        Libc::Musl
    } else if name.starts_with("ld-linux") || name.starts_with("ld64.so") || name == "ld.so.1" {
        // ld-linux-x86-64.so.2, ld-linux-aarch64.so.1, ld-linux.so.2 (x86), ld-linux-armhf.so.3,
        // ld-linux-riscv64-lp64d.so.1; ld64.so.2 (powerpc64), ld64.so.1 (s390x); ld.so.1 (powerpc, mips).
        Libc::Glibc
    } else {
        Libc::Other(path)
    }
}

/// What a non-ELF file looks like, from its first bytes.
fn detect(bytes: &[u8]) -> &'static str {
    match bytes {
        [] => "an empty file",
        [0xfe, 0xed, 0xfa, 0xce | 0xcf, ..] | [0xce | 0xcf, 0xfa, 0xed, 0xfe, ..] => "a Mach-O binary (macOS)",
        [0xca, 0xfe, 0xba, 0xbe, 0, 0, 0, 0..=0x13, ..] => "a universal Mach-O binary (macOS)",
        [0xca, 0xfe, 0xba, 0xbe, ..] => "a Java class file",
        [b'M', b'Z', ..] => "a PE executable (Windows)",
        [b'#', b'!', ..] => "a script (#!)",
        [0x00, b'a', b's', b'm', ..] => "a WebAssembly module",
        [b'P', b'K', 0x03, 0x04, ..] => "a zip archive",
        [0x1f, 0x8b, ..] => "a gzip archive",
        [b'!', b'<', b'a', b'r', b'c', b'h', b'>', ..] => "an ar archive (static library)",
        [0x7f, b'E', b'L', ..] => "a truncated ELF file",
        _ => "an unknown format",
    }
}

/// A binary that cannot run on a node, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    /// The binary is for another architecture.
    #[error(
        "binary is built for {binary} but the node is {node_arch} ({}); {}",
        node_libc_name(.node_libc),
        advice(.node_arch, .node_libc)
    )]
    Arch {
        /// The binary.
        binary: BinaryFacts,
        /// `std::env::consts::ARCH` of the node.
        node_arch: String,
        /// C library of the node: `glibc`, `musl` or `none`.
        node_libc: String,
    },
    /// Right architecture, but the binary needs a C library (program interpreter) the node lacks.
    #[error(
        "binary is built for {binary} but the node is {node_arch} ({}), which cannot load it; {}",
        node_libc_name(.node_libc),
        advice(.node_arch, .node_libc)
    )]
    Libc {
        /// The binary.
        binary: BinaryFacts,
        /// `std::env::consts::ARCH` of the node.
        node_arch: String,
        /// C library of the node: `glibc`, `musl` or `none`.
        node_libc: String,
    },
}

/// Normalized C library of a node: `Some("glibc")`, `Some("musl")`, `Some("none")`, or `None`
/// when unknown. Accepts Rust's `target_env` spellings too (`gnu`, empty).
fn node_libc_kind(libc: &str) -> Option<&'static str> {
    match libc.trim().to_ascii_lowercase().as_str() {
        "glibc" | "gnu" => Some("glibc"),
        "musl" => Some("musl"),
        "none" | "" | "static" => Some("none"),
        _ => None,
    }
}

fn node_libc_name(libc: &str) -> String {
    match node_libc_kind(libc) {
        Some("none") => "no C library".to_owned(),
        Some(kind) => kind.to_owned(),
        None => format!("unknown C library `{libc}`"),
    }
}

/// "build with --target ... and pass it with Compute::binary(..)" for a node.
fn advice(node_arch: &str, node_libc: &str) -> String {
    // A musl target links statically by default and so runs on any node of the architecture.
    let env = if node_libc_kind(node_libc) == Some("glibc") { "gnu" } else { "musl" };
    let triple = match node_arch {
        "x86_64" => format!("x86_64-unknown-linux-{env}"),
        "aarch64" => format!("aarch64-unknown-linux-{env}"),
        "x86" => format!("i686-unknown-linux-{env}"),
        "arm" => format!("armv7-unknown-linux-{env}eabihf"),
        "riscv64" => format!("riscv64gc-unknown-linux-{env}"),
        "powerpc64" => format!("powerpc64le-unknown-linux-{env}"),
        "s390x" => format!("s390x-unknown-linux-{env}"),
        "loongarch64" => format!("loongarch64-unknown-linux-{env}"),
        other => return format!("build for a {other} Linux target (statically linked to be safe) and pass it with Compute::binary(..)"),
    };
    format!("build with --target {triple} and pass it with Compute::binary(..)")
}

/// Whether `binary` can run on a node whose `std::env::consts::ARCH` is `target_arch` and whose C
/// library is `target_libc` (`"glibc"`, `"musl"` or `"none"`).
///
/// The architecture must match. A static binary runs on any node of its architecture; a glibc
/// binary needs a glibc node and a musl binary a musl node (a glibc node is not assumed to have a
/// musl loader); a binary with any other interpreter is refused, as is any dynamic binary when the
/// node's C library is not one of the three known names.
pub fn check_compatible(binary: &BinaryFacts, target_arch: &str, target_libc: &str) -> Result<(), Incompatible> {
    let fields = || (binary.clone(), target_arch.to_owned(), target_libc.to_owned());
    if binary.arch != target_arch {
        let (binary, node_arch, node_libc) = fields();
        return Err(Incompatible::Arch { binary, node_arch, node_libc });
    }
    let runs = matches!(
        (&binary.libc, node_libc_kind(target_libc)),
        (Libc::Static, _) | (Libc::Glibc, Some("glibc")) | (Libc::Musl, Some("musl"))
    );
    if runs {
        Ok(())
    } else {
        let (binary, node_arch, node_libc) = fields();
        Err(Incompatible::Libc { binary, node_arch, node_libc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF file: header, one program header table, optionally a PT_INTERP.
    fn build(is_64: bool, big_endian: bool, machine: u16, e_type: u16, interp: Option<&str>) -> Vec<u8> {
        let layout = Layout { is_64, big_endian };
        let (ehsize, phentsize) = if is_64 { (64usize, 56usize) } else { (52, 32) };
        let put16 = |buf: &mut Vec<u8>, at: usize, v: u16| {
            let b = if layout.big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
            buf[at..at + 2].copy_from_slice(&b);
        };
        let put32 = |buf: &mut Vec<u8>, at: usize, v: u32| {
            let b = if layout.big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
            buf[at..at + 4].copy_from_slice(&b);
        };
        let put_word = |buf: &mut Vec<u8>, at32: usize, at64: usize, v: u64| {
            if layout.is_64 {
                let b = if layout.big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
                buf[at64..at64 + 8].copy_from_slice(&b);
            } else {
                put32(buf, at32, v as u32);
            }
        };
        // Two program headers: PT_LOAD, then PT_INTERP (or PT_NOTE when there is none).
        let phnum = 2;
        let interp_offset = ehsize + phnum * phentsize;
        let interp_bytes = interp.map(|p| [p.as_bytes(), b"\0"].concat()).unwrap_or_default();
        let mut buf = vec![0u8; interp_offset + interp_bytes.len()];
        buf[..4].copy_from_slice(b"\x7fELF");
        buf[4] = if is_64 { 2 } else { 1 };
        buf[5] = if big_endian { 2 } else { 1 };
        buf[6] = 1;
        put16(&mut buf, 16, e_type);
        put16(&mut buf, 18, machine);
        put32(&mut buf, 20, 1);
        put_word(&mut buf, 28, 32, ehsize as u64); // e_phoff
        put16(&mut buf, if is_64 { 52 } else { 40 }, ehsize as u16);
        put16(&mut buf, if is_64 { 54 } else { 42 }, phentsize as u16);
        put16(&mut buf, if is_64 { 56 } else { 44 }, phnum as u16);
        let load = ehsize;
        put32(&mut buf, load, 1);
        let second = ehsize + phentsize;
        put32(&mut buf, second, if interp.is_some() { PT_INTERP } else { 4 });
        put_word(&mut buf, second + 4, second + 8, interp_offset as u64);
        put_word(&mut buf, second + 16, second + 32, interp_bytes.len() as u64);
        buf[interp_offset..].copy_from_slice(&interp_bytes);
        buf
    }

    fn facts(arch: &str, libc: Libc) -> BinaryFacts {
        BinaryFacts { arch: arch.to_owned(), libc }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn current_executable_is_dynamic_glibc_of_this_arch() {
        let exe = std::env::current_exe().unwrap();
        let from_file = inspect_file(&exe).unwrap();
        assert_eq!(from_file, facts(std::env::consts::ARCH, Libc::Glibc));
        assert_eq!(inspect(&std::fs::read(&exe).unwrap()).unwrap(), from_file);
        check_compatible(&from_file, std::env::consts::ARCH, "glibc").unwrap();
    }

    #[test]
    fn hand_built_headers() {
        let cases = [
            (build(true, false, 183, 3, Some("/lib/ld-linux-aarch64.so.1")), facts("aarch64", Libc::Glibc)),
            (build(true, false, 62, 3, Some("/lib/ld-musl-x86_64.so.1")), facts("x86_64", Libc::Musl)),
            (build(true, false, 62, 2, None), facts("x86_64", Libc::Static)),
            (build(true, false, 62, 3, None), facts("x86_64", Libc::Static)), // static-pie
            (build(false, false, 3, 2, Some("/lib/ld-linux.so.2")), facts("x86", Libc::Glibc)),
            (build(false, false, 40, 2, Some("/lib/ld-linux-armhf.so.3")), facts("arm", Libc::Glibc)),
            (build(false, false, 40, 2, None), facts("arm", Libc::Static)),
            (build(true, true, 21, 2, Some("/lib64/ld64.so.1")), facts("powerpc64", Libc::Glibc)),
            (build(true, false, 21, 3, Some("/lib64/ld64.so.2")), facts("powerpc64", Libc::Glibc)),
            (build(true, true, 22, 3, Some("/lib/ld64.so.1")), facts("s390x", Libc::Glibc)),
            (build(true, false, 243, 3, Some("/lib/ld-linux-riscv64-lp64d.so.1")), facts("riscv64", Libc::Glibc)),
            (build(true, false, 183, 3, Some("/system/bin/linker64")), facts("aarch64", Libc::Other("/system/bin/linker64".into()))),
        ];
        for (bytes, expected) in cases {
            assert_eq!(inspect(&bytes).unwrap(), expected);
        }
    }

    #[test]
    fn inspect_file_matches_inspect() {
        let dir = std::env::temp_dir().join(format!("skyward-elf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("musl-bin");
        std::fs::write(&path, build(true, false, 183, 3, Some("/lib/ld-musl-aarch64.so.1"))).unwrap();
        assert_eq!(inspect_file(&path).unwrap(), facts("aarch64", Libc::Musl));
        std::fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(inspect_file(&path), Err(ElfError::NotElf { detected: "a script (#!)" })));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(inspect_file(&path), Err(ElfError::Io { .. })));
    }

    #[test]
    fn other_formats_are_named() {
        let cases: [(&[u8], &str); 8] = [
            (&[0xfe, 0xed, 0xfa, 0xcf, 0, 0, 0, 7], "a Mach-O binary (macOS)"),
            (&[0xcf, 0xfa, 0xed, 0xfe, 7, 0, 0, 1], "a Mach-O binary (macOS)"),
            (&[0xca, 0xfe, 0xba, 0xbe, 0, 0, 0, 2], "a universal Mach-O binary (macOS)"),
            (b"MZ\x90\x00\x03\x00", "a PE executable (Windows)"),
            (b"#!/usr/bin/env python3\n", "a script (#!)"),
            (b"", "an empty file"),
            (b"\x7fEL", "a truncated ELF file"),
            (b"hello, world", "an unknown format"),
        ];
        for (bytes, name) in cases {
            match inspect(bytes) {
                Err(ElfError::NotElf { detected }) => assert_eq!(detected, name),
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
        let message = inspect(&[0xcf, 0xfa, 0xed, 0xfe]).unwrap_err().to_string();
        assert!(message.contains("Mach-O"), "{message}");
    }

    #[test]
    fn garbage_never_panics() {
        let good = build(true, false, 62, 3, Some("/lib64/ld-linux-x86-64.so.2"));
        // Every truncation of a valid file is an error, never a panic.
        for len in 0..good.len() {
            assert!(inspect(&good[..len]).is_err(), "truncated to {len}");
        }
        assert!(matches!(inspect(&good[..40]), Err(ElfError::Truncated { .. })));
        assert!(matches!(inspect(&good[..good.len() - 3]), Err(ElfError::Truncated { what: "interpreter path" })));
        // Every single-byte corruption (and a few values per byte) is handled without panic.
        let mut rng = SplitMix(1);
        for at in 0..good.len() {
            for value in [0, 1, 2, 0x7f, 0xff, rng.byte()] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = inspect(&bad);
            }
        }
        // Random garbage behind a valid magic.
        for _ in 0..2000 {
            let len = usize::from(rng.byte()) % 200;
            let mut bad: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            if bad.len() >= 6 {
                bad[..4].copy_from_slice(b"\x7fELF");
                bad[4] = 1 + rng.byte() % 2;
                bad[5] = 1 + rng.byte() % 2;
            }
            let _ = inspect(&bad);
        }
        // Specific malformations.
        let mut bad = good.clone();
        bad[4] = 3;
        assert!(matches!(inspect(&bad), Err(ElfError::Malformed { .. })));
        let mut bad = good.clone();
        bad[18..20].copy_from_slice(&0x1234u16.to_le_bytes());
        assert!(matches!(inspect(&bad), Err(ElfError::UnknownMachine { machine: 0x1234 })));
        let mut bad = good.clone();
        bad[16] = 1;
        assert!(matches!(inspect(&bad), Err(ElfError::NotExecutable { .. })));
        let mut bad = good.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff far away
        assert!(matches!(inspect(&bad), Err(ElfError::Truncated { what: "program header table" })));
        let mut bad = good;
        bad[56..58].copy_from_slice(&0xffffu16.to_le_bytes()); // PN_XNUM, section headers far away
        bad[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(inspect(&bad), Err(ElfError::Truncated { .. })));
    }

    struct SplitMix(u64);

    impl SplitMix {
        fn byte(&mut self) -> u8 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            (z >> 56) as u8
        }
    }

    #[test]
    fn compatibility() {
        let glibc = facts("x86_64", Libc::Glibc);
        let musl = facts("x86_64", Libc::Musl);
        let stat = facts("x86_64", Libc::Static);
        let other = facts("x86_64", Libc::Other("/opt/ld.so".into()));
        check_compatible(&glibc, "x86_64", "glibc").unwrap();
        check_compatible(&glibc, "x86_64", "gnu").unwrap();
        check_compatible(&musl, "x86_64", "musl").unwrap();
        for libc in ["glibc", "musl", "none", "whatever"] {
            check_compatible(&stat, "x86_64", libc).unwrap();
            assert!(matches!(check_compatible(&stat, "aarch64", libc), Err(Incompatible::Arch { .. })));
            assert!(check_compatible(&other, "x86_64", libc).is_err());
        }
        assert!(matches!(check_compatible(&glibc, "x86_64", "musl"), Err(Incompatible::Libc { .. })));
        assert!(matches!(check_compatible(&glibc, "x86_64", "none"), Err(Incompatible::Libc { .. })));
        assert!(matches!(check_compatible(&musl, "x86_64", "glibc"), Err(Incompatible::Libc { .. })));
        assert!(matches!(check_compatible(&glibc, "x86_64", "whatever"), Err(Incompatible::Libc { .. })));
    }

    #[test]
    fn messages_say_what_to_do() {
        let arm = facts("aarch64", Libc::Glibc);
        assert_eq!(
            check_compatible(&arm, "x86_64", "glibc").unwrap_err().to_string(),
            "binary is built for aarch64 (glibc) but the node is x86_64 (glibc); \
             build with --target x86_64-unknown-linux-gnu and pass it with Compute::binary(..)"
        );
        let glibc = facts("x86_64", Libc::Glibc);
        assert_eq!(
            check_compatible(&glibc, "x86_64", "musl").unwrap_err().to_string(),
            "binary is built for x86_64 (glibc) but the node is x86_64 (musl), which cannot load it; \
             build with --target x86_64-unknown-linux-musl and pass it with Compute::binary(..)"
        );
        let message = check_compatible(&glibc, "aarch64", "none").unwrap_err().to_string();
        assert!(message.contains("aarch64 (no C library)") && message.contains("aarch64-unknown-linux-musl"), "{message}");
        assert_eq!(Libc::Other("/x/ld.so".into()).to_string(), "interpreter /x/ld.so");
        assert_eq!(facts("arm", Libc::Static).to_string(), "arm (static)");
    }
}
