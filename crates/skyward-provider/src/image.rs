//! `Image`: what a node needs before tasks run (apt packages, environment, setup commands, pip
//! packages), rendered to one idempotent shell script.
//!
//! The same `Image` always renders the same script, and the script's SHA-256 is the image's
//! identity: the cache key of a prebaked image. Package lists are sorted and de-duplicated so
//! that order does not change the identity; setup commands keep their order. Every value is
//! validated or shell-quoted: nothing from an `Image` can inject into the script.
//!
//! Idempotent: apt installs only what is missing, the Python environment is created once, and
//! each setup command runs once per node (a marker named by the command's hash records it).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Version of the rendering; part of every image's identity.
const RENDER_VERSION: u32 = 1;

/// The software environment of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    apt: Vec<String>,
    pip: Vec<String>,
    env: BTreeMap<String, String>,
    setup: Vec<String>,
    syncs: Vec<crate::sync::SyncDir>,
}

/// An `Image` value that cannot be rendered safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// A package name with characters no package name has.
    #[error(
        "invalid {manager} package name {name:?}: start with a letter or digit; apt allows . + - = ~ : after it, pip also _ < > ! , [ ]"
    )]
    Package {
        /// `apt` or `pip`.
        manager: &'static str,
        /// The name given.
        name: String,
    },
    /// An environment variable name that a shell cannot export.
    #[error("invalid environment variable name {0:?}: use letters, digits and _, not starting with a digit")]
    EnvName(String),
    /// A sync target that could escape its quoting or its directory.
    #[error("invalid sync target {0:?}: no quotes, newlines or `..`")]
    SyncTarget(String),
    /// A value with a NUL byte, which no shell string can hold.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which value.
        what: String,
    },
}

/// Quote `s` for a POSIX shell: the result is always one literal word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn check_package(manager: &'static str, name: &str) -> Result<(), ImageError> {
    // apt names go into the script unquoted (a word list), so they get the narrower set; pip
    // specifiers (`numpy>=2`) are always quoted.
    let extra = if manager == "apt" { ".+-=~:" } else { "._+-=<>~:!,[]" };
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    if ok { Ok(()) } else { Err(ImageError::Package { manager, name: name.to_string() }) }
}

fn sorted_unique(list: &[String]) -> Vec<String> {
    let mut v = list.to_vec();
    v.sort();
    v.dedup();
    v
}

impl Image {
    /// An empty image: the machine as the provider gives it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Debian/Ubuntu packages to install.
    pub fn apt<I: IntoIterator<Item = S>, S: Into<String>>(mut self, packages: I) -> Self {
        self.apt.extend(packages.into_iter().map(Into::into));
        self
    }

    /// Python packages to install (with uv when present, else pip in a virtual environment).
    pub fn pip<I: IntoIterator<Item = S>, S: Into<String>>(mut self, packages: I) -> Self {
        self.pip.extend(packages.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the worker and every task.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// A shell command to run once per node, after packages, in order.
    pub fn setup(mut self, command: impl Into<String>) -> Self {
        self.setup.push(command.into());
        self
    }

    /// Copy a local directory (filtered by include/exclude globs) onto every node, at each
    /// bootstrap. Not part of the image's identity: files change between runs, a prebaked image
    /// never holds them.
    pub fn sync(mut self, dir: crate::sync::SyncDir) -> Self {
        self.syncs.push(dir);
        self
    }

    /// The directories to sync.
    pub fn syncs(&self) -> &[crate::sync::SyncDir] {
        &self.syncs
    }

    /// Whether the image asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.apt.is_empty() && self.pip.is_empty() && self.env.is_empty() && self.setup.is_empty() && self.syncs.is_empty()
    }

    /// Check every value.
    pub fn validate(&self) -> Result<(), ImageError> {
        for s in &self.syncs {
            s.validate().map_err(|_| ImageError::SyncTarget(s.remote().to_string()))?;
        }
        for p in &self.apt {
            check_package("apt", p)?;
        }
        for p in &self.pip {
            check_package("pip", p)?;
        }
        for (k, v) in &self.env {
            let mut chars = k.chars();
            let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ImageError::EnvName(k.clone()));
            }
            if v.contains('\0') {
                return Err(ImageError::Nul { what: format!("the value of {k}") });
            }
        }
        if let Some(i) = self.setup.iter().position(|c| c.contains('\0')) {
            return Err(ImageError::Nul { what: format!("setup command {}", i + 1) });
        }
        Ok(())
    }

    /// The bootstrap script. Markers and the Python environment live under
    /// `${SKYWARD_IMAGE_DIR:-/var/lib/skyward/image}`.
    pub fn render(&self) -> Result<String, ImageError> {
        self.validate()?;
        let mut s = String::new();
        let _ = writeln!(s, "#!/bin/sh");
        let _ = writeln!(s, "# Skyward image bootstrap (render v{RENDER_VERSION}). Idempotent: safe to run again.");
        let _ = writeln!(s, "set -eu");
        let _ = writeln!(s, "SKYWARD_IMAGE_DIR=\"${{SKYWARD_IMAGE_DIR:-/var/lib/skyward/image}}\"");
        let _ = writeln!(s, "mkdir -p \"$SKYWARD_IMAGE_DIR/done\"");
        if !self.env.is_empty() {
            let _ = writeln!(s, "\n# environment");
            let _ = writeln!(s, ": > \"$SKYWARD_IMAGE_DIR/env.sh\"");
            for (k, v) in &self.env {
                let line = format!("export {k}={}", shell_quote(v));
                let _ = writeln!(s, "{line}");
                let _ = writeln!(s, "printf '%s\\n' {} >> \"$SKYWARD_IMAGE_DIR/env.sh\"", shell_quote(&line));
            }
        }
        let apt = sorted_unique(&self.apt);
        if !apt.is_empty() {
            let _ = writeln!(s, "\n# apt packages: install only the missing ones");
            let _ = writeln!(s, "missing=\"\"");
            let _ = writeln!(s, "for p in {}; do", apt.join(" "));
            let _ = writeln!(s, "  dpkg -s \"$p\" >/dev/null 2>&1 || missing=\"$missing $p\"");
            let _ = writeln!(s, "done");
            let _ = writeln!(s, "if [ -n \"$missing\" ]; then");
            let _ = writeln!(s, "  export DEBIAN_FRONTEND=noninteractive");
            let _ = writeln!(s, "  apt-get update -q");
            let _ = writeln!(s, "  apt-get install -y -q --no-install-recommends $missing");
            let _ = writeln!(s, "fi");
        }
        let pip = sorted_unique(&self.pip);
        if !pip.is_empty() {
            let quoted: Vec<String> = pip.iter().map(|p| shell_quote(p)).collect();
            let _ = writeln!(s, "\n# Python packages: uv when present, else pip in a virtual environment");
            let _ = writeln!(s, "venv=\"$SKYWARD_IMAGE_DIR/venv\"");
            let _ = writeln!(s, "if command -v uv >/dev/null 2>&1; then");
            let _ = writeln!(s, "  [ -x \"$venv/bin/python\" ] || uv venv \"$venv\"");
            let _ = writeln!(s, "  uv pip install --python \"$venv/bin/python\" {}", quoted.join(" "));
            let _ = writeln!(s, "else");
            let _ = writeln!(s, "  [ -x \"$venv/bin/python\" ] || python3 -m venv \"$venv\"");
            let _ = writeln!(s, "  \"$venv/bin/pip\" install -q {}", quoted.join(" "));
            let _ = writeln!(s, "fi");
        }
        for command in &self.setup {
            let id = crate::hex(&Sha256::digest(command.as_bytes()))[..16].to_string();
            let _ = writeln!(s, "\n# setup {id}");
            let _ = writeln!(s, "if [ ! -e \"$SKYWARD_IMAGE_DIR/done/{id}\" ]; then");
            let _ = writeln!(s, "  sh -c {}", shell_quote(command));
            let _ = writeln!(s, "  : > \"$SKYWARD_IMAGE_DIR/done/{id}\"");
            let _ = writeln!(s, "fi");
        }
        Ok(s)
    }

    /// The image's identity: SHA-256 of its script, hex. The cache key of a prebaked image.
    pub fn hash(&self) -> Result<String, ImageError> {
        Ok(crate::hex(&Sha256::digest(self.render()?.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Image {
        Image::new()
            .apt(["python3-numpy", "curl", "curl"])
            .pip(["torch==2.4.0", "numpy"])
            .env("MODEL_DIR", "/data/it's \"quoted\"\nnext line")
            .setup("echo once >> \"$SKYWARD_IMAGE_DIR/log\"")
    }

    #[test]
    fn same_image_same_script_and_order_of_packages_does_not_matter() {
        assert_eq!(sample().render().unwrap(), sample().render().unwrap());
        let reordered = Image::new()
            .apt(["curl", "python3-numpy"])
            .pip(["numpy", "torch==2.4.0"])
            .env("MODEL_DIR", "/data/it's \"quoted\"\nnext line")
            .setup("echo once >> \"$SKYWARD_IMAGE_DIR/log\"");
        assert_eq!(sample().hash().unwrap(), reordered.hash().unwrap());
        assert_ne!(sample().hash().unwrap(), sample().setup("true").hash().unwrap());
        assert_ne!(sample().hash().unwrap(), sample().env("X", "1").hash().unwrap());
    }

    #[test]
    fn bad_values_are_refused_with_the_name() {
        let err = Image::new().apt(["curl; rm -rf /"]).render().unwrap_err();
        assert!(err.to_string().contains("curl; rm -rf /"), "{err}");
        assert!(matches!(Image::new().pip(["-e ."]).render(), Err(ImageError::Package { manager: "pip", .. })));
        assert!(matches!(Image::new().apt(["libc6>/tmp/x"]).render(), Err(ImageError::Package { manager: "apt", .. })));
        assert!(Image::new().pip(["numpy>=2,<3", "torch[cuda]==2.4.0"]).render().is_ok());
        assert_eq!(Image::new().env("1BAD", "x").render().unwrap_err(), ImageError::EnvName("1BAD".into()));
        assert!(matches!(Image::new().setup("a\0b").render(), Err(ImageError::Nul { .. })));
    }

    #[test]
    fn the_script_is_valid_shell_and_runs_setup_once() {
        // Only env and setup (no apt/pip, which need root and a network): run it twice for real.
        let image = Image::new()
            .env("GREETING", "it's \"here\"\nand $HOME stays literal")
            .setup("echo \"$GREETING\" >> \"$SKYWARD_IMAGE_DIR/log\"");
        let script = image.render().unwrap();
        let dir = std::env::temp_dir().join(format!("skyward-image-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for _ in 0..2 {
            let out = std::process::Command::new("sh").arg("-c").arg(&script).env("SKYWARD_IMAGE_DIR", &dir).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let log = std::fs::read_to_string(dir.join("log")).unwrap();
        assert_eq!(log, "it's \"here\"\nand $HOME stays literal\n", "setup ran once, value kept literally");
        let env = std::fs::read_to_string(dir.join("env.sh")).unwrap();
        assert!(env.starts_with("export GREETING='it'\\''s"), "{env}");
        let _ = std::fs::remove_dir_all(&dir);
        // The full sample parses as shell.
        let status = std::process::Command::new("sh").arg("-n").arg("-c").arg(sample().render().unwrap()).status().unwrap();
        assert!(status.success());
    }
}
