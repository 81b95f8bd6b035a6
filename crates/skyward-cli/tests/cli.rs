//! `skyward cleanup` end to end on real docker: what a dead coordinator left is removed, what a
//! coordinator on another machine owns is kept unless `--force`, bad usage exits 2.

use std::process::Command;

fn skyward(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skyward")).args(args).output().expect("run skyward");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn network(name: &str, pool: &str, owner: &str) {
    let status = Command::new("docker")
        .args(["network", "create", "--internal", "--label", &format!("dev.skyward.pool={pool}")])
        .args(["--label", &format!("dev.skyward.owner={owner}"), name])
        .output()
        .expect("docker");
    assert!(status.status.success(), "docker network create: {}", String::from_utf8_lossy(&status.stderr));
}

fn network_exists(name: &str) -> bool {
    Command::new("docker").args(["network", "inspect", name]).output().expect("docker").status.success()
}

#[test]
fn cleanup_removes_what_dead_pools_left_and_keeps_the_rest() {
    let id = std::process::id();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_string();
    let (dead, foreign, alive) = (format!("sky-clitest-dead-{id}"), format!("sky-clitest-foreign-{id}"), format!("sky-clitest-alive-{id}"));
    // A pid far above pid_max cannot exist; this test process is alive.
    network(&dead, &dead, &format!("{host}:{boot}:4194304999:5"));
    network(&foreign, &foreign, "another-host:another-boot:1:1");
    let me = std::fs::read_to_string(format!("/proc/{id}/stat")).unwrap();
    let start = me.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().to_string();
    network(&alive, &alive, &format!("{host}:{boot}:{id}:{start}"));

    let (code, out) = skyward(&["cleanup", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("would remove network   {dead}")), "{out}");
    assert!(network_exists(&dead), "a dry run removes nothing");

    let (code, out) = skyward(&["cleanup"]);
    assert_eq!(code, 0, "{out}");
    assert!(!network_exists(&dead), "the dead pool's network is gone: {out}");
    assert!(network_exists(&foreign) && out.contains(&format!("kept pool {foreign}")), "{out}");
    assert!(network_exists(&alive) && out.contains(&format!("kept pool {alive}")), "{out}");

    let (code, out) = skyward(&["cleanup", "--force"]);
    assert_eq!(code, 0, "{out}");
    assert!(!network_exists(&foreign), "--force removes what cannot be checked: {out}");
    assert!(network_exists(&alive), "--force never removes a live pool: {out}");
    let _ = Command::new("docker").args(["network", "rm", &alive]).output();

    let (code, out) = skyward(&["cleanup", "--runtime", "lxc"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a supported container runtime"), "{out}");
}
