//! Files to sync onto every node: a local directory filtered by include/exclude globs, packed
//! into a tar archive (ustar with GNU long names) that the bootstrap unpacks on the node.
//!
//! Globs match paths relative to the directory, with `/` separators: `*` and `?` stay within one
//! path component, `**` crosses components. A pattern without `/` matches any single component
//! (`*.pyc`, `target`, `.git`), like a gitignore entry. A file is synced when no exclude matches
//! it or any directory above it, and, if includes are given, one include matches it.
//! Only regular files and directories travel; symbolic links and special files are skipped.

use std::path::{Path, PathBuf};

/// One directory to sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncDir {
    local: PathBuf,
    remote: String,
    include: Vec<String>,
    exclude: Vec<String>,
}

/// Why a sync could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The local directory is missing or unreadable.
    #[error("sync {path}: {message}")]
    Local {
        /// Path.
        path: PathBuf,
        /// Details.
        message: String,
    },
    /// The remote path is unsafe.
    #[error("sync target {0:?} is not a safe path (no quotes, newlines or `..`)")]
    Remote(String),
}

/// A packed sync: where it goes and the archive.
#[derive(Debug, Clone)]
pub struct PackedSync {
    /// Remote directory (relative ones are under the node's Skyward root).
    pub remote: String,
    /// The tar archive.
    pub archive: Vec<u8>,
    /// Regular files in it.
    pub files: usize,
    /// Entries skipped (links, special files).
    pub skipped: usize,
}

impl SyncDir {
    /// Sync `local` (a directory on this machine) to `remote` on every node.
    pub fn new(local: impl Into<PathBuf>, remote: impl Into<String>) -> Self {
        Self { local: local.into(), remote: remote.into(), include: Vec::new(), exclude: Vec::new() }
    }

    /// Only files matching one of the includes travel.
    pub fn include(mut self, glob: impl Into<String>) -> Self {
        self.include.push(glob.into());
        self
    }

    /// Files and directories matching an exclude stay behind.
    pub fn exclude(mut self, glob: impl Into<String>) -> Self {
        self.exclude.push(glob.into());
        self
    }

    /// The remote directory.
    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// Check the remote path.
    pub fn validate(&self) -> Result<(), SyncError> {
        let r = &self.remote;
        if r.is_empty() || r.contains(['\'', '\n', '\0']) || r.split('/').any(|c| c == "..") {
            return Err(SyncError::Remote(r.clone()));
        }
        Ok(())
    }

    fn excluded(&self, rel: &str) -> bool {
        self.exclude.iter().any(|g| matches_path(g, rel))
    }

    fn included(&self, rel: &str) -> bool {
        self.include.is_empty() || self.include.iter().any(|g| matches_path(g, rel))
    }

    /// Walk the directory and pack what passes the filters.
    pub fn pack(&self) -> Result<PackedSync, SyncError> {
        self.validate()?;
        let err = |path: &Path, e: std::io::Error| SyncError::Local { path: path.to_path_buf(), message: e.to_string() };
        let meta = std::fs::metadata(&self.local).map_err(|e| err(&self.local, e))?;
        if !meta.is_dir() {
            return Err(SyncError::Local { path: self.local.clone(), message: "not a directory".into() });
        }
        let mut tar = Tar::default();
        let mut stack = vec![String::new()];
        let (mut files, mut skipped) = (0, 0);
        while let Some(dir_rel) = stack.pop() {
            let dir = if dir_rel.is_empty() { self.local.clone() } else { self.local.join(&dir_rel) };
            let mut entries: Vec<_> =
                std::fs::read_dir(&dir).map_err(|e| err(&dir, e))?.collect::<Result<_, _>>().map_err(|e| err(&dir, e))?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let name = entry.file_name().to_string_lossy().into_owned();
                let rel = if dir_rel.is_empty() { name } else { format!("{dir_rel}/{name}") };
                if self.excluded(&rel) {
                    continue;
                }
                let file_type = entry.file_type().map_err(|e| err(&entry.path(), e))?;
                let meta = entry.metadata().map_err(|e| err(&entry.path(), e))?;
                if file_type.is_dir() {
                    tar.dir(&rel, &meta);
                    stack.push(rel);
                } else if file_type.is_file() {
                    if self.included(&rel) {
                        if meta.len() >= 8 << 30 {
                            return Err(SyncError::Local {
                                path: entry.path(),
                                message: "files of 8 GiB or more cannot be synced (hint: exclude it and fetch it on the node)".into(),
                            });
                        }
                        let data = std::fs::read(entry.path()).map_err(|e| err(&entry.path(), e))?;
                        tar.file(&rel, &meta, &data);
                        files += 1;
                    }
                } else {
                    skipped += 1;
                }
            }
        }
        Ok(PackedSync { remote: self.remote.clone(), archive: tar.finish(), files, skipped })
    }
}

/// Whether `glob` matches the relative path `rel`, or (for a pattern without `/`) any of its
/// components.
fn matches_path(glob: &str, rel: &str) -> bool {
    let glob = glob.trim_start_matches("./").trim_end_matches('/');
    if glob.contains('/') {
        // `dir/**` also matches `dir` itself (prunes the directory).
        matches(glob.as_bytes(), rel.as_bytes()) || glob.strip_suffix("/**").is_some_and(|g| matches(g.as_bytes(), rel.as_bytes()))
    } else {
        rel.split('/').any(|component| matches(glob.as_bytes(), component.as_bytes()))
    }
}

/// Glob match: `**` any run of bytes, `*` any run without `/`, `?` one byte other than `/`.
fn matches(pattern: &[u8], text: &[u8]) -> bool {
    match pattern {
        [] => text.is_empty(),
        [b'*', b'*', rest @ ..] => {
            let rest = rest.strip_prefix(b"/").unwrap_or(rest);
            (0..=text.len()).any(|i| matches(rest, &text[i..]))
        }
        [b'*', rest @ ..] => {
            let limit = text.iter().position(|&b| b == b'/').unwrap_or(text.len());
            (0..=limit).any(|i| matches(rest, &text[i..]))
        }
        [b'?', rest @ ..] => text.first().is_some_and(|&b| b != b'/') && matches(rest, &text[1..]),
        [c, rest @ ..] => text.first() == Some(c) && matches(rest, &text[1..]),
    }
}

/// A minimal tar writer: ustar headers, GNU `L` entries for names over 100 bytes.
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

impl Tar {
    fn header(&mut self, name: &[u8], mode: u32, size: u64, mtime: u64, kind: u8) {
        let mut h = [0u8; 512];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(mode & 0o7777));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], mtime);
        h[148..156].fill(b' ');
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        octal(&mut h[148..155], u64::from(sum));
        h[155] = b' ';
        self.out.extend_from_slice(&h);
    }

    fn entry(&mut self, name: &str, meta: &std::fs::Metadata, kind: u8, data: &[u8]) {
        use std::os::unix::fs::MetadataExt;
        let name = if kind == b'5' { format!("{name}/") } else { name.to_string() };
        if name.len() > 100 {
            let long = [name.as_bytes(), b"\0"].concat();
            self.header(b"././@LongLink", 0o644, long.len() as u64, 0, b'L');
            self.data(&long);
        }
        self.header(name.as_bytes(), meta.mode(), data.len() as u64, meta.mtime().max(0) as u64, kind);
        self.data(data);
    }

    fn data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn dir(&mut self, name: &str, meta: &std::fs::Metadata) {
        self.entry(name, meta, b'5', &[]);
    }

    fn file(&mut self, name: &str, meta: &std::fs::Metadata, data: &[u8]) {
        self.entry(name, meta, b'0', data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

/// Write `value` as zero-padded octal filling `field` but its last byte (NUL).
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    let s = &s.as_bytes()[s.len().saturating_sub(width)..];
    field[..width].copy_from_slice(s);
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches_path("*.py", "src/app/main.py"));
        assert!(!matches_path("*.py", "src/app/main.pyc"));
        assert!(matches_path("target", "target/debug/x"));
        assert!(matches_path("src/**/*.rs", "src/a/b/c.rs"));
        assert!(matches_path("src/**/*.rs", "src/c.rs"));
        assert!(!matches_path("src/*.rs", "src/a/c.rs"));
        assert!(matches_path("data/**", "data"));
        assert!(matches_path("data/?.csv", "data/1.csv"));
        assert!(!matches_path("data/?.csv", "data/12.csv"));
    }

    #[test]
    fn packs_what_the_filters_let_through_and_tar_reads_it() {
        let base = std::env::temp_dir().join(format!("skyward-sync-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let src = base.join("src");
        let long_dir = "d".repeat(60);
        std::fs::create_dir_all(src.join("pkg").join(&long_dir)).unwrap();
        std::fs::create_dir_all(src.join("target/debug")).unwrap();
        std::fs::write(src.join("main.py"), "print('hi')\n").unwrap();
        std::fs::write(src.join("notes.txt"), "skip me").unwrap();
        std::fs::write(src.join("pkg/mod.py"), "x = 1\n").unwrap();
        std::fs::write(src.join("pkg").join(&long_dir).join(format!("{}.py", "f".repeat(60))), "deep\n").unwrap();
        std::fs::write(src.join("target/debug/big.py"), "excluded").unwrap();
        let packed = SyncDir::new(&src, "app").include("*.py").exclude("target").pack().unwrap();
        assert_eq!(packed.files, 3);
        let out = base.join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(base.join("a.tar"), &packed.archive).unwrap();
        let status = std::process::Command::new("tar").arg("-xf").arg(base.join("a.tar")).arg("-C").arg(&out).status().unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read_to_string(out.join("main.py")).unwrap(), "print('hi')\n");
        assert_eq!(std::fs::read_to_string(out.join("pkg").join(&long_dir).join(format!("{}.py", "f".repeat(60)))).unwrap(), "deep\n");
        assert!(!out.join("notes.txt").exists() && !out.join("target").exists());
        std::fs::remove_dir_all(&base).unwrap();
        assert!(SyncDir::new(&src, "../etc").validate().is_err());
    }
}
