//! Built-in command tasks: run a program with argv, env and cwd, stream its output line by line.

use skyward_proto::error::{RemoteError, RemoteErrorKind};
use skyward_proto::message::{CommandExit, CommandSpec, OutputStream};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Run `spec`, calling `on_line` for every line of output, and return how it ended.
pub async fn run(spec: CommandSpec, on_line: impl Fn(OutputStream, String) + Send + Sync + 'static) -> Result<CommandExit, RemoteError> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(RemoteError::new(RemoteErrorKind::Command, "command has an empty argv"));
    };
    let mut command = tokio::process::Command::new(program);
    command.args(args).envs(&spec.env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    // Its own process group, so a timeout or a cancel ends what the command started too (a
    // background child would otherwise keep the pipes open and the task alive).
    command.process_group(0);
    let mut child = command.spawn().map_err(|e| {
        let mut err = RemoteError::new(RemoteErrorKind::Command, format!("cannot start `{program}`: {e}"));
        err.type_name = "std::io::Error".into();
        err
    })?;
    struct KillGroup(Option<u32>);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            if let Some(pgid) = self.0 {
                // SAFETY: killpg takes plain integers; a group that is gone yields ESRCH.
                unsafe {
                    libc::killpg(pgid as i32, libc::SIGKILL);
                }
            }
        }
    }
    let mut group = KillGroup(child.id());
    let on_line = std::sync::Arc::new(on_line);
    let out = pump(child.stdout.take(), OutputStream::Stdout, std::sync::Arc::clone(&on_line));
    let err = pump(child.stderr.take(), OutputStream::Stderr, on_line);
    let wait = async {
        let (status, (), ()) = tokio::join!(child.wait(), out, err);
        status
    };
    let status = match spec.timeout {
        Some(limit) => match tokio::time::timeout(limit, wait).await {
            Ok(status) => status,
            Err(_) => {
                return Err(RemoteError::new(RemoteErrorKind::Command, format!("`{program}` timed out after {limit:?} and was killed")));
            }
        },
        None => wait.await,
    }
    .map_err(|e| RemoteError::new(RemoteErrorKind::Command, format!("cannot wait for `{program}`: {e}")))?;
    // Exited normally: leave any processes it deliberately left running alone.
    group.0 = None;
    use std::os::unix::process::ExitStatusExt;
    Ok(CommandExit { code: status.code(), signal: status.signal() })
}

async fn pump(pipe: Option<impl AsyncRead + Unpin>, stream: OutputStream, on_line: std::sync::Arc<impl Fn(OutputStream, String)>) {
    let Some(pipe) = pipe else { return };
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        on_line(stream, line);
    }
}
