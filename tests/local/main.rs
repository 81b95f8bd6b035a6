//! Integration tests on the Local provider (real worker processes, the real QUIC path) and on
//! the Container provider (real docker containers with sshd, bootstrapped over SSH).
//!
//! `harness = false`: the test binary is also the program the workers run as executor, so `main`
//! calls `skyward::init()` before anything else, then hands over to libtest-mimic.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod support;
mod tests_cluster;
mod tests_container;
mod tests_dispatch;
mod tests_failures;
mod tests_providers;
mod tests_teardown;
mod tests_transport;

use libtest_mimic::{Arguments, Trial};

fn main() {
    skyward::init();
    if support::run_child_mode() {
        return;
    }
    let args = Arguments::from_args();
    let mut trials: Vec<Trial> = Vec::new();
    trials.extend(tests_cluster::trials());
    trials.extend(tests_container::trials());
    trials.extend(tests_dispatch::trials());
    trials.extend(tests_failures::trials());
    trials.extend(tests_providers::trials());
    trials.extend(tests_providers::start_trials());
    trials.extend(tests_providers::call_trials());
    trials.extend(tests_providers::cloud_pool_trials());
    trials.extend(tests_teardown::trials());
    trials.extend(tests_transport::trials());
    libtest_mimic::run(&args, trials).exit();
}
