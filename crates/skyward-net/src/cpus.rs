//! The CPUs of this machine a thread may use, and the one it runs on: what the Local provider
//! slices among its nodes, what a worker reports in its facts, and what the coordinator compares
//! to place a call on a node that shares the caller's CPU (see `docs/architecture.md`, "Near
//! nodes").

#[cfg(target_os = "linux")]
use std::collections::HashMap;

/// The CPUs the calling thread may use, the hardware threads of one core next to each other
/// (ordered by package, core and number from sysfs, by number alone where sysfs does not say),
/// so that contiguous slices hold whole cores. Empty if the kernel will not say.
#[cfg(target_os = "linux")]
pub fn allowed() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask the kernel fills; its size is passed along.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        tracing::debug!("sched_getaffinity failed: {}", std::io::Error::last_os_error());
        return Vec::new();
    }
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the mask filled above, with an index inside it.
    let mut cpus: Vec<usize> = (0..bits).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect();
    let cores = core_of_cpu();
    cpus.sort_by_key(|&cpu| (cores.get(&cpu).copied().unwrap_or_default(), cpu));
    cpus
}

/// The CPUs the calling thread may use: unknown off Linux.
#[cfg(not(target_os = "linux"))]
pub fn allowed() -> Vec<usize> {
    Vec::new()
}

/// `(package, core)` of every CPU sysfs lists, read once per process (the machine's topology
/// does not change; the mask above is read per call, as it may).
#[cfg(target_os = "linux")]
fn core_of_cpu() -> &'static HashMap<usize, (usize, usize)> {
    static CORES: std::sync::OnceLock<HashMap<usize, (usize, usize)>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| {
        let read = |cpu: usize, what: &str| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{what}"))
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        let Ok(entries) = std::fs::read_dir("/sys/devices/system/cpu") else { return HashMap::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("cpu")?.parse::<usize>().ok())
            .map(|cpu| (cpu, (read(cpu, "physical_package_id"), read(cpu, "core_id"))))
            .collect()
    })
}

/// The CPU the calling thread runs on now (it may move right after). A memory read where glibc
/// has registered restartable sequences, a vDSO call otherwise: cheap enough for every dispatch.
#[cfg(target_os = "linux")]
pub fn current() -> Option<u32> {
    // SAFETY: no arguments; returns -1 on failure.
    u32::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// The CPU the calling thread runs on: unknown off Linux.
#[cfg(not(target_os = "linux"))]
pub fn current() -> Option<u32> {
    None
}

/// A `cpu_set_t` holding `cpus` (indices past the mask's size are left out).
#[cfg(target_os = "linux")]
pub fn mask(cpus: &[usize]) -> libc::cpu_set_t {
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes bits inside it (checked).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&cpu| cpu < bits) {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn this_thread_runs_on_one_of_its_allowed_cpus() {
        let allowed = allowed();
        assert!(!allowed.is_empty(), "sched_getaffinity gave no CPU");
        let mut sorted = allowed.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), allowed.len(), "a CPU listed twice: {allowed:?}");
        let now = current().expect("sched_getcpu");
        assert!(allowed.contains(&(now as usize)), "running on CPU {now}, allowed {allowed:?}");
        let set = mask(&allowed);
        // SAFETY: reads bits of a mask built above, with indices inside it.
        assert!(allowed.iter().all(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }));
    }
}
