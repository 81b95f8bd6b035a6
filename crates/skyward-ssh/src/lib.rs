//! SSH for Skyward: the per-pool key, host-key pinning, command execution with streamed output,
//! checksummed uploads, and the node bootstrap every provider that hands back a host shares.
//!
//! Built on russh (client only). Trust model: the pool's ed25519 key (file mode 0600 in the
//! pool's state directory) authenticates us; the node's host key is pinned on first contact and
//! must match on every later connection to that node (trust on first use, per node, per pool).

mod bootstrap;
mod key;

pub use bootstrap::{BootstrapError, BootstrapPlan, BootstrapTimings, TAIL_LINES, bootstrap, install, start_worker, sync_files};
pub use key::{KEY_FILE, PoolKey};

use russh::ChannelMsg;
use russh::client;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Where to reach a node's SSH server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login user.
    pub user: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)
    }
}

/// A node's host key, pinned on first contact. Clones share the pin.
#[derive(Debug, Clone, Default)]
pub struct HostKeyPin(Arc<Mutex<Option<String>>>);

impl HostKeyPin {
    /// A pin that accepts the first key it sees.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pin that accepts only `fingerprint` (`SHA256:...`).
    pub fn with(fingerprint: impl Into<String>) -> Self {
        Self(Arc::new(Mutex::new(Some(fingerprint.into()))))
    }

    /// The pinned fingerprint, once known.
    pub fn fingerprint(&self) -> Option<String> {
        self.0.lock().expect("pin lock").clone()
    }

    fn check(&self, seen: &str) -> bool {
        let mut pinned = self.0.lock().expect("pin lock");
        match pinned.as_deref() {
            None => {
                *pinned = Some(seen.to_string());
                true
            }
            Some(p) => p == seen,
        }
    }
}

/// SSH failures, each naming the node's address.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// No TCP connection or SSH handshake within the deadline.
    #[error("ssh {target}: not reachable after {attempts} attempts in {waited:?}: {last}")]
    Unreachable {
        /// Address.
        target: String,
        /// Connection attempts made.
        attempts: u32,
        /// Time spent.
        waited: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// The server's host key differs from the pinned one.
    #[error("ssh {target}: host key changed (pinned {pinned}, offered {offered}); refusing to connect")]
    HostKeyMismatch {
        /// Address.
        target: String,
        /// Pinned fingerprint.
        pinned: String,
        /// Offered fingerprint.
        offered: String,
    },
    /// The server rejected the pool key.
    #[error("ssh {target}: the pool key was rejected for user {user:?}")]
    AuthRejected {
        /// Address.
        target: String,
        /// User.
        user: String,
    },
    /// A channel operation failed.
    #[error("ssh {target}: {operation}: {message}")]
    Channel {
        /// Address.
        target: String,
        /// What was attempted.
        operation: &'static str,
        /// Details.
        message: String,
    },
    /// A local file could not be used.
    #[error("{path}: {message}")]
    Local {
        /// Path.
        path: String,
        /// Details.
        message: String,
    },
}

struct PinHandler {
    pin: HostKeyPin,
    offered: Arc<Mutex<Option<String>>>,
}

impl client::Handler for PinHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let fingerprint = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.fingerprint(HashAlg::Sha256).to_string(),
            // Host certificates are not part of the trust model: refuse them.
            russh::keys::PublicKeyOrCertificate::Certificate(_) => return Ok(false),
        };
        *self.offered.lock().expect("offered lock") = Some(fingerprint.clone());
        Ok(self.pin.check(&fingerprint))
    }
}

/// One authenticated SSH connection to a node.
pub struct Session {
    handle: client::Handle<PinHandler>,
    target: Target,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("target", &self.target).finish_non_exhaustive()
    }
}

/// What a remote command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status, when the command exited normally.
    pub status: Option<u32>,
    /// Signal name, when the command was killed by one.
    pub signal: Option<String>,
    /// The last lines of its output (stdout and stderr interleaved), at most `keep` lines.
    pub tail: Vec<String>,
}

impl ExecOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// "exit status 3" or "killed by signal KILL" or "no exit status".
    pub fn describe(&self) -> String {
        match (&self.status, &self.signal) {
            (Some(s), _) => format!("exit status {s}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "no exit status (connection closed)".to_string(),
        }
    }
}

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(5)),
        keepalive_max: 3,
        nodelay: true,
        // AES-GCM first: with AES-NI on both ends it moves a worker binary several times faster
        // than ChaCha20-Poly1305 (russh's default first choice).
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(&[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM, russh::cipher::CHACHA20_POLY1305]),
            ..Default::default()
        },
        ..Default::default()
    })
}

impl Session {
    /// Connect and authenticate once.
    pub async fn connect(target: &Target, key: &PoolKey, pin: &HostKeyPin) -> Result<Session, SshError> {
        match Self::attempt(target, key, pin).await {
            Ok(s) => Ok(s),
            Err(Attempt::Fatal(e)) => Err(e),
            Err(Attempt::Retry(last)) => {
                Err(SshError::Unreachable { target: target.to_string(), attempts: 1, waited: Duration::ZERO, last })
            }
        }
    }

    /// Connect, retrying while the server is not up yet (refused, reset, handshake cut short),
    /// with backoff from 25 ms doubling to 200 ms (a refused connection costs next to nothing;
    /// a long pause only delays the start), for at most `deadline`. A changed host key or a
    /// rejected key fails at once.
    pub async fn connect_with_backoff(target: &Target, key: &PoolKey, pin: &HostKeyPin, deadline: Duration) -> Result<Session, SshError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(25);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_sub(started.elapsed());
            let outcome = match tokio::time::timeout(left.max(Duration::from_millis(1)), Self::attempt(target, key, pin)).await {
                Ok(r) => r,
                Err(_) => Err(Attempt::Retry("attempt timed out".into())),
            };
            match outcome {
                Ok(s) => return Ok(s),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(last)) => {
                    if started.elapsed() + backoff >= deadline {
                        return Err(SshError::Unreachable { target: target.to_string(), attempts, waited: started.elapsed(), last });
                    }
                    tracing::trace!(%target, attempts, %last, "ssh not up yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    async fn attempt(target: &Target, key: &PoolKey, pin: &HostKeyPin) -> Result<Session, Attempt> {
        let offered = Arc::new(Mutex::new(None));
        let handler = PinHandler { pin: pin.clone(), offered: Arc::clone(&offered) };
        let mut handle = match client::connect(client_config(), (target.host.as_str(), target.port), handler).await {
            Ok(h) => h,
            Err(e) => {
                let offered = offered.lock().expect("offered lock").clone();
                if let (Some(offered), Some(pinned)) = (offered, pin.fingerprint())
                    && offered != pinned
                {
                    return Err(Attempt::Fatal(SshError::HostKeyMismatch { target: target.to_string(), pinned, offered }));
                }
                return Err(Attempt::Retry(e.to_string()));
            }
        };
        let auth = handle
            .authenticate_publickey(&target.user, PrivateKeyWithHashAlg::new(key.private(), None))
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        if !auth.success() {
            return Err(Attempt::Fatal(SshError::AuthRejected { target: target.to_string(), user: target.user.clone() }));
        }
        Ok(Session { handle, target: target.clone() })
    }

    /// The address this session is connected to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn channel_error(&self, operation: &'static str, e: impl std::fmt::Display) -> SshError {
        SshError::Channel { target: self.target.to_string(), operation, message: e.to_string() }
    }

    /// Run `command` (through the login shell), feed it `stdin`, call `on_line` for each line of
    /// its output as it arrives (stdout and stderr), and keep the last `keep` lines.
    pub async fn exec(&self, command: &str, stdin: Option<&[u8]>, keep: usize, on_line: impl FnMut(&str)) -> Result<ExecOutput, SshError> {
        self.exec_reading(command, stdin, keep, on_line).await
    }

    /// `exec` with input from any reader. Input is written while output is read: a command that
    /// talks before it has read all its input cannot stall the connection.
    async fn exec_reading<R: tokio::io::AsyncRead + Unpin>(
        &self,
        command: &str,
        input: Option<R>,
        keep: usize,
        mut on_line: impl FnMut(&str),
    ) -> Result<ExecOutput, SshError> {
        let channel = self.handle.channel_open_session().await.map_err(|e| self.channel_error("open channel", e))?;
        channel.exec(true, command).await.map_err(|e| self.channel_error("exec", e))?;
        let (mut read_half, write_half) = channel.split();
        let writer = async {
            if let Some(input) = input {
                let mut writer = write_half.make_writer();
                // Large writes: russh's channel writer moves 1 MiB far faster than small chunks.
                let mut reader = tokio::io::BufReader::with_capacity(1 << 20, input);
                tokio::io::copy_buf(&mut reader, &mut writer).await.map_err(|e| self.channel_error("send input", e))?;
                writer.flush().await.map_err(|e| self.channel_error("send input", e))?;
            }
            write_half.eof().await.map_err(|e| self.channel_error("send eof", e))
        };
        let reader = async {
            let mut lines = LineSplitter::new(keep);
            let mut status = None;
            let mut signal = None;
            while let Some(msg) = read_half.wait().await {
                match msg {
                    ChannelMsg::Data { data } => lines.push(&data, &mut on_line),
                    ChannelMsg::ExtendedData { data, .. } => lines.push(&data, &mut on_line),
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(format!("{signal_name:?}")),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            lines.finish(&mut on_line);
            ExecOutput { status, signal, tail: lines.tail.into() }
        };
        let (written, output) = tokio::join!(writer, reader);
        // A command that exits before reading all its input makes the write fail: its exit
        // status and output say more than the broken write.
        if output.status.is_none() && output.signal.is_none() {
            written?;
        }
        Ok(output)
    }

    /// Run `command` and return its whole output; fails unless it exits with status 0.
    pub async fn run(&self, command: &str) -> Result<String, SshError> {
        let mut out = String::new();
        let result = self
            .exec(command, None, 50, |l| {
                out.push_str(l);
                out.push('\n');
            })
            .await?;
        if !result.success() {
            return Err(self.channel_error("command", format!("{command:?} failed ({}): {}", result.describe(), result.tail.join("\n"))));
        }
        Ok(out)
    }

    /// Copy the local file at `local` to `remote` (mode `mode`), verifying its SHA-256 on the
    /// node before it is moved into place; skipped when `remote` already has that hash.
    /// Returns whether bytes were sent.
    pub async fn upload_file(&self, local: &Path, sha256_hex: &str, remote: &str, mode: u32) -> Result<bool, SshError> {
        check_remote_path(remote).map_err(|m| self.channel_error("upload", m))?;
        let present = self.exec(&format!("echo '{sha256_hex}  {remote}' | sha256sum -c --status 2>/dev/null"), None, 0, |_| {}).await?;
        if present.success() {
            return Ok(false);
        }
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| SshError::Local { path: local.display().to_string(), message: format!("cannot open for upload: {e}") })?;
        let part = format!("{remote}.part.{}", std::process::id());
        let command = format!(
            "set -e; mkdir -p \"$(dirname '{remote}')\"; cat > '{part}'; \
             if ! echo '{sha256_hex}  {part}' | sha256sum -c --status; then rm -f '{part}'; echo 'checksum mismatch after upload' >&2; exit 3; fi; \
             chmod {mode:o} '{part}'; mv -f '{part}' '{remote}'"
        );
        let out = self.exec_reading(&command, Some(&mut file), 20, |_| {}).await?;
        if !out.success() {
            return Err(self.channel_error("upload", format!("writing {remote} failed ({}): {}", out.describe(), out.tail.join("\n"))));
        }
        Ok(true)
    }

    /// Write `contents` to `remote` with `mode` (the file is created with that mode: a secret is
    /// never readable by others, not even for a moment).
    pub async fn write_file(&self, remote: &str, contents: &[u8], mode: u32) -> Result<(), SshError> {
        check_remote_path(remote).map_err(|m| self.channel_error("write file", m))?;
        let command = format!(
            "set -e; mkdir -p \"$(dirname '{remote}')\"; umask 077; rm -f '{remote}.tmp'; cat > '{remote}.tmp'; chmod {mode:o} '{remote}.tmp'; mv -f '{remote}.tmp' '{remote}'"
        );
        let out = self.exec(&command, Some(contents), 20, |_| {}).await?;
        if !out.success() {
            return Err(self.channel_error("write file", format!("{remote}: {}: {}", out.describe(), out.tail.join("\n"))));
        }
        Ok(())
    }

    /// A byte stream to the Unix socket at `path` on the node (`direct-streamlocal`, which
    /// sshd allows unless `AllowStreamLocalForwarding no`).
    pub async fn open_unix_stream(&self, path: &str) -> Result<russh::ChannelStream<client::Msg>, SshError> {
        let channel =
            self.handle.channel_open_direct_streamlocal(path).await.map_err(|e| self.channel_error("open a channel to a socket", e))?;
        Ok(channel.into_stream())
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Close the connection.
    pub async fn close(&self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}

/// Remote paths are put in single quotes: refuse any that could break out of them.
fn check_remote_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.contains(['\'', '\n', '\0']) {
        return Err(format!("unsafe remote path {path:?}"));
    }
    Ok(())
}

enum Attempt {
    Retry(String),
    Fatal(SshError),
}

/// Splits a byte stream into lines (lossy UTF-8), keeping the last `keep`.
struct LineSplitter {
    partial: Vec<u8>,
    tail: VecDeque<String>,
    keep: usize,
}

impl LineSplitter {
    fn new(keep: usize) -> Self {
        Self { partial: Vec::new(), tail: VecDeque::new(), keep }
    }

    fn push(&mut self, data: &[u8], on_line: &mut impl FnMut(&str)) {
        for &b in data {
            if b == b'\n' {
                self.emit(on_line);
            } else if self.partial.len() < 64 * 1024 {
                self.partial.push(b);
            }
        }
    }

    fn emit(&mut self, on_line: &mut impl FnMut(&str)) {
        let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
        self.partial.clear();
        on_line(&line);
        if self.keep > 0 {
            if self.tail.len() == self.keep {
                self.tail.pop_front();
            }
            self.tail.push_back(line);
        }
    }

    fn finish(&mut self, on_line: &mut impl FnMut(&str)) {
        if !self.partial.is_empty() {
            self.emit(on_line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_tail_is_bounded() {
        let mut s = LineSplitter::new(2);
        let mut seen = Vec::new();
        s.push(b"one\ntw", &mut |l| seen.push(l.to_string()));
        s.push(b"o\r\nthree\nfour", &mut |l| seen.push(l.to_string()));
        s.finish(&mut |l| seen.push(l.to_string()));
        assert_eq!(seen, ["one", "two", "three", "four"]);
        assert_eq!(Vec::from(s.tail), ["three", "four"]);
    }

    #[test]
    fn pin_accepts_first_key_then_only_that_key() {
        let pin = HostKeyPin::new();
        assert!(pin.check("SHA256:a"));
        assert!(pin.check("SHA256:a"));
        assert!(!pin.check("SHA256:b"));
        assert_eq!(pin.fingerprint().as_deref(), Some("SHA256:a"));
        assert!(!HostKeyPin::with("SHA256:x").check("SHA256:a"));
    }

    #[test]
    fn remote_paths_that_could_escape_quotes_are_refused() {
        assert!(check_remote_path("/var/lib/skyward/bin/w").is_ok());
        assert!(check_remote_path("/tmp/x'; rm -rf / #").is_err());
        assert!(check_remote_path("").is_err());
    }
}
