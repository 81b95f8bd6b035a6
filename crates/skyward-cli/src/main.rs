//! `skyward`: the command-line tool.
//!
//! Verbs: `offers` (what the configured providers sell, cheapest first), `cleanup` (find and
//! remove what abandoned pools left behind). Exit status 0 on success, 1 when something failed,
//! 2 for bad usage.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod offers;

use skyward_provider::container::{self, Runtime};
use std::process::ExitCode;

const USAGE: &str = "\
usage: skyward <command> [options]

commands:
  offers [--provider runpod,vastai] [--accelerator NAME[:COUNT]] [--count N] [--max-price USD]
         [--spot | --on-demand] [--region R] [--limit N] [--refresh] [--json]
      Offers of the configured providers (those whose credentials are set: RUNPOD_API_KEY,
      VAST_API_KEY; AWS_ACCESS_KEY_ID or AWS_PROFILE in a build with --features aws),
      cheapest first, filtered. Catalogs are cached in ~/.skyward/offers
      (minutes for marketplaces); --refresh fetches them again.
  cleanup --cloud runpod,vastai [--pool POOL_ID] [--force] [--dry-run]
      Terminate (and confirm) the machines a pool left on those clouds: the pool's with
      --pool, every Skyward machine with --force; without either they are only listed.
  cleanup [--dry-run] [--force] [--runtime docker|podman|nerdctl]
      Remove every container and network labelled by a Skyward pool whose coordinator
      process no longer runs. Pools whose coordinator is alive are left alone; so are pools
      whose coordinator cannot be checked from here (another machine or PID namespace)
      unless --force is given.
  help
      Show this text.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("cleanup") => cleanup(&args[1..]),
        Some("offers") => offers::main(&args[1..]),
        Some("help" | "-h" | "--help") | None => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("--version" | "-V") => {
            println!("skyward {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => usage_error(&format!("unknown command {other:?}")),
    }
}

fn cloud_cleanup(rt: &tokio::runtime::Runtime, names: &[String], pool: Option<&str>, force: bool, dry_run: bool) -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let (providers, problems) = match offers::providers(Some(names), &env) {
        Ok(p) => p,
        Err(e) => return usage_error(&e),
    };
    for p in &problems {
        eprintln!("error: {p}");
    }
    let rows = match rt.block_on(offers::sweep(&providers, pool, force, dry_run)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = !problems.is_empty();
    for (provider, id, node, pool, outcome) in &rows {
        match outcome {
            Ok(true) => {
                println!("{} {provider} machine {id:<20} node {node} pool {pool}", if dry_run { "would remove" } else { "removed" })
            }
            Ok(false) => println!("kept {provider} machine {id:<20} node {node} pool {pool} (--pool {pool} or --force removes it)"),
            Err(e) => {
                failed = true;
                eprintln!("error: {provider} machine {id}: {e}");
            }
        }
    }
    if rows.is_empty() && problems.is_empty() {
        println!("no Skyward machine found on {}", names.join(", "));
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

pub(crate) fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

fn cleanup(args: &[String]) -> ExitCode {
    let mut dry_run = false;
    let mut force = false;
    let mut runtime = Runtime::Docker;
    let mut cloud: Option<Vec<String>> = None;
    let mut pool: Option<String> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--dry-run" | "-n" => dry_run = true,
            "--force" => force = true,
            "--cloud" => match rest.next() {
                Some(v) => cloud = Some(v.split(',').map(|s| s.trim().to_ascii_lowercase()).collect()),
                None => return usage_error("--cloud needs a provider list"),
            },
            "--pool" => match rest.next() {
                Some(v) => pool = Some(v.clone()),
                None => return usage_error("--pool needs a pool id"),
            },
            "--runtime" => match rest.next().map(|v| v.parse::<Runtime>()) {
                Some(Ok(r)) => runtime = r,
                Some(Err(e)) => return usage_error(&e.to_string()),
                None => return usage_error("--runtime needs a value"),
            },
            other => return usage_error(&format!("cleanup: unknown option {other:?}")),
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(names) = cloud {
        return cloud_cleanup(&rt, &names, pool.as_deref(), force, dry_run);
    }
    if pool.is_some() {
        return usage_error("--pool goes with --cloud (containers are matched by their coordinator)");
    }
    let report = match rt.block_on(container::cleanup(runtime, dry_run, force)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cleanup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let verb = if dry_run { "would remove" } else { "removed" };
    for c in &report.containers {
        println!("{verb} container {:<40} pool {} ({})", c.name, c.pool_id, c.state);
    }
    for n in &report.networks {
        println!("{verb} network   {:<40} pool {}", n.name, n.pool_id);
    }
    for p in &report.running_pools {
        println!("kept pool {p}: its coordinator is still running");
    }
    for p in &report.unknown_pools {
        println!("kept pool {p}: its coordinator runs elsewhere or cannot be checked from here (--force removes it)");
    }
    if report.containers.is_empty() && report.networks.is_empty() {
        println!("nothing left behind ({} runtime)", runtime.program());
    }
    ExitCode::SUCCESS
}
