//! The `qemu` provisioner with real processes: an agent runs each replica in a QEMU microVM
//! (TCG here) booted from the guest image, beside an agent with process workers; a 3-task
//! chain whose two memory-heavy tasks only fit the VM host serves invocations through the
//! process worker and both VMs, and removing the graph stops every VM, leaving no QEMU behind
//! (a guard kills any that a failing test would leave).

mod common;

use common::*;
use std::time::{Duration, Instant};

const GRAPH: &str = r#"
name = "vm-chain"
[[task]]
id = "front"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "100us"
resources = { cpu = "500m", memory = "64MiB" }

[[task]]
id = "upper"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "100us"
resources = { cpu = "1", memory = "192MiB" }

[[task]]
id = "digest"
code = { builtin = "sha256" }
inputs = { x = "bytes" }
outputs = { d = "bytes" }
estimate = "100us"
resources = { cpu = "1", memory = "192MiB" }

[[edge]]
from = "front.y"
to = "upper.x"

[[edge]]
from = "upper.y"
to = "digest.x"
"#;

const SOLO: &str = r#"
name = "vm-solo"
[[task]]
id = "solo"
code = { builtin = "sha256" }
inputs = { x = "bytes" }
outputs = { d = "bytes" }
estimate = "100us"
resources = { cpu = "1", memory = "192MiB" }
"#;

fn sha256_hex(input: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(input.as_bytes());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pids of QEMU processes whose command line names `dir`.
fn qemus(dir: &std::path::Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.starts_with("qemu-system") && cmd.contains(&needle)).then_some(pid)
        })
        .collect()
}

/// Every VM's console (what its guest printed), for failure messages.
fn consoles(agent_data: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(agent_data.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default();
        out.push_str(&format!("--- {}:\n{text}\n", e.path().display()));
    }
    out
}

/// Kills every QEMU of this test's directory when dropped, pass or fail.
struct NoQemuLeft(std::path::PathBuf);

impl Drop for NoQemuLeft {
    fn drop(&mut self) {
        for pid in qemus(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Agent `a1` with the `qemu` provisioner under TCG, booting `image`, its data in `dir/a1`,
/// with `extra` flags.
fn vm_agent(
    control: &Control,
    cpus: u32,
    dir: &std::path::Path,
    image: &str,
    extra: &[&str],
) -> Agent {
    let data = dir.join("a1");
    let mut args = vec![
        "--provisioner",
        "qemu",
        "--guest-image",
        image,
        "--accel",
        "tcg",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Agent::start_with(&control.addr, "a1", cpus, dir, &args)
}

fn guest_image() -> String {
    let dir = repo_path("target/guest");
    assert!(
        std::path::Path::new(&dir)
            .join("initramfs.cpio.gz")
            .exists(),
        "no guest image in {dir}: run `cargo xtask guest-image` (`cargo xtask test` does)"
    );
    dir
}

#[test]
fn a_chain_runs_through_microvms_and_leaves_no_qemu_behind() {
    let image = guest_image();
    let dir = TempDir::new("qemu");
    let _guard = NoQemuLeft(dir.path().to_path_buf());
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let vm_data = dir.path().join("a1");
    let vm_data = vm_data.to_str().unwrap();
    let vms = Agent::start_with(
        &control.addr,
        "a1",
        3,
        dir.path(),
        &[
            "--provisioner",
            "qemu",
            "--guest-image",
            &image,
            "--memory",
            "2GiB",
            "--data-dir",
            vm_data,
        ],
    );
    // The process host has the most CPU (spread puts `front` there) and too little memory for
    // the other two.
    let _processes = Agent::start_with(&control.addr, "a2", 8, dir.path(), &["--memory", "160MiB"]);
    control.wait_agents(2);
    let agents = control.cli_json(&["agents"]);
    let provisioner = |name: &str| {
        agents
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name))
            .map(|x| x["provisioner"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    // This host's /dev/kvm cannot run guests: the probe falls back to TCG, and says so.
    assert_eq!(provisioner("a1"), "qemu (tcg)", "{agents}");
    assert_eq!(provisioner("a2"), "process", "{agents}");
    let path = dir.path().join("vm-chain.toml");
    std::fs::write(&path, GRAPH).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    let replicas = wait_deployed(&control, "vm-chain", 3, 1);
    let host_of = |task: &str| {
        replicas["replicas"]
            .as_array()
            .and_then(|r| r.iter().find(|x| x["task"] == task))
            .map(|x| x["host"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        (host_of("front"), host_of("upper"), host_of("digest")),
        ("a2".into(), "a1".into(), "a1".into()),
        "{replicas}"
    );
    let replica_vms = qemus(&std::path::Path::new(vm_data).join("vms/g1."));
    assert_eq!(replica_vms.len(), 2, "one VM per replica on a1");
    let log = vms.log_text();
    assert!(log.contains("microVM ready"), "{log}");
    // Invocations enter at an ingress, pass the process worker, then both VMs.
    for i in 0..20 {
        let input = format!("hello {i}");
        let out = control.cli_json(&["invoke", "vm-chain", "--input", &format!("={input}")]);
        let digest = out["outputs"]["digest.d"].to_string();
        let expected = sha256_hex(&input);
        assert!(digest.contains(&expected), "{out} (want {expected})");
    }
    // Meanwhile a1 saved a snapshot of a booted idle guest of that shape (1 vCPU, 288 MiB): a
    // VM of the same shape now starts from it instead of booting.
    let until = Instant::now() + Duration::from_secs(60);
    while !vms.log_text().contains("VM snapshot saved") {
        assert!(Instant::now() < until, "no snapshot: {}", vms.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let path = dir.path().join("vm-solo.toml");
    std::fs::write(&path, SOLO).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "vm-solo", 1, 1);
    let ev = events(&control);
    let (_, _, why) = ev
        .iter()
        .find(|(k, s, _)| k == "replica-ready" && s.starts_with("g2.solo"))
        .unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(why.contains("its VM restored in"), "{why}");
    let booted = ev
        .iter()
        .filter(|(k, s, r)| {
            k == "replica-ready" && s.starts_with("g1.") && r.contains("its VM booted in")
        })
        .count();
    assert_eq!(booted, 2, "{ev:#?}");
    let out = control.cli_json(&["invoke", "vm-solo", "--input", "=restored"]);
    assert!(
        out["outputs"]["solo.d"]
            .to_string()
            .contains(&sha256_hex("restored")),
        "{out}"
    );
    // A VM that dies (its QEMU killed here; a crashed guest worker ends its VM the same way)
    // is reported lost with how, and replaced.
    let solo = qemus(&std::path::Path::new(vm_data).join("vms/g2.solo.r1"));
    assert_eq!(solo.len(), 1);
    std::process::Command::new("kill")
        .args(["-9", &solo[0].to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = events(&control);
        let lost = ev
            .iter()
            .find(|(k, s, _)| k == "replica-lost" && s == "g2.solo.r1");
        let replaced = ev.iter().any(|(k, s, _)| {
            k == "replica-ready" && s.starts_with("g2.solo.r") && s != "g2.solo.r1"
        });
        if let (Some((_, _, why)), true) = (lost, replaced) {
            assert!(
                why.contains("the VM stopped") && why.contains("SIGKILL"),
                "{why}"
            );
            break;
        }
        assert!(Instant::now() < until, "no replacement: {ev:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Removing the graph drains and stops both VMs: each guest's worker finishes and exits,
    // its init powers the VM off, and QEMU ends.
    control.cli_ok(&["rm", "vm-chain"]);
    control.cli_ok(&["rm", "vm-solo"]);
    let until = Instant::now() + Duration::from_secs(20);
    while !qemus(dir.path()).is_empty() {
        assert!(
            Instant::now() < until,
            "QEMU still running: {:?}\n{}\n{}",
            qemus(dir.path()),
            vms.log_text(),
            consoles(std::path::Path::new(vm_data))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each drained worker exited, its guest powered off, and QEMU ended by itself.
    let log = vms.log_text();
    let drained: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("retired replica drained"))
        .collect();
    for r in ["g1.upper.r", "g1.digest.r"] {
        assert!(
            drained
                .iter()
                .any(|l| l.contains(r) && l.contains("the VM stopped (exit status: 0)")),
            "{r}: {drained:#?}"
        );
    }
}

/// The guest's initramfs without `module` in its load order: the guest then never sees the
/// device that module drives (newc entries rewritten; the kernel reads nothing else).
fn initramfs_without(module: &str) -> Vec<u8> {
    use std::io::Write;
    let gz = std::fs::read(std::path::Path::new(&guest_image()).join("initramfs.cpio.gz")).unwrap();
    let mut unzip = std::process::Command::new("gzip")
        .args(["-dc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = unzip.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&gz));
    let cpio = unzip.wait_with_output().unwrap().stdout;
    writer.join().unwrap().unwrap();
    let (mut out, mut at) = (Vec::new(), 0);
    let pad = |n: usize| n.div_ceil(4) * 4;
    while at + 110 <= cpio.len() {
        let field = |i: usize| {
            usize::from_str_radix(
                std::str::from_utf8(&cpio[at + 6 + i * 8..at + 14 + i * 8]).unwrap(),
                16,
            )
            .unwrap()
        };
        let (size, name_len) = (field(6), field(11));
        let name_end = at + 110 + name_len;
        let data_at = pad(name_end);
        let name = String::from_utf8_lossy(&cpio[at + 110..name_end - 1]).to_string();
        let mut data = cpio[data_at..data_at + size].to_vec();
        if name == "modules.order" {
            data = String::from_utf8_lossy(&data)
                .lines()
                .filter(|l| *l != module)
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .into_bytes();
        }
        let mut header = cpio[at..at + 110].to_vec();
        header[54..62].copy_from_slice(format!("{:08x}", data.len()).as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&cpio[at + 110..name_end]);
        out.resize(pad(out.len()), 0);
        out.extend_from_slice(&data);
        out.resize(pad(out.len()), 0);
        at = pad(data_at + size);
        if name == "TRAILER!!!" {
            break;
        }
    }
    out
}

/// A guest image in `dir` made from the real one with `junk` (a file of it) spoilt: the
/// initramfs replaced by junk, or without the virtio-serial driver (the guest waits for a
/// channel that never appears).
fn broken_image(dir: &std::path::Path, junk: &str) -> String {
    let real = std::path::PathBuf::from(guest_image());
    std::fs::create_dir_all(dir).unwrap();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        if junk == "no-channel" && f == "initramfs.cpio.gz" {
            // Uncompressed: the kernel takes a plain cpio as well.
            std::fs::write(dir.join(f), initramfs_without("virtio_console")).unwrap();
        } else if f == junk {
            std::fs::write(dir.join(f), vec![0x5a; 1 << 20]).unwrap();
        } else {
            std::fs::copy(real.join(f), dir.join(f)).unwrap();
        }
    }
    dir.to_string_lossy().to_string()
}

/// A VM host whose guests cannot start (`junk` spoils the image) beside a process host: the
/// replica's failure is an event naming why, and its replacement lands on the other host.
fn a_failing_vm_is_placed_elsewhere(junk: &str, timeout_ms: &str, why: &str) {
    let dir = TempDir::new("qemu-fails");
    let _guard = NoQemuLeft(dir.path().to_path_buf());
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let image = broken_image(&dir.path().join("image"), junk);
    let _vms = vm_agent(
        &control,
        8,
        dir.path(),
        &image,
        &["--vm-ready-timeout-ms", timeout_ms],
    );
    let _processes = Agent::start(&control.addr, "a2", 2, dir.path());
    control.wait_agents(2);
    let path = dir.path().join("solo.toml");
    std::fs::write(&path, SOLO).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    let replicas = wait_deployed(&control, "vm-solo", 1, 1);
    let ready: Vec<&serde_json::Value> = replicas["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "ready")
        .collect();
    assert_eq!(ready[0]["host"], "a2", "{replicas}");
    let ev = events(&control);
    let (_, _, failed) = ev
        .iter()
        .find(|(k, s, _)| k == "replica-failed" && s == "g1.solo.r1")
        .unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(
        failed.contains("on a1 failed") && failed.contains(why),
        "{failed}"
    );
    let (_, _, placed) = ev
        .iter()
        .rev()
        .find(|(k, s, _)| k == "replica-placed" && s.starts_with("g1.solo"))
        .unwrap();
    assert!(
        placed.contains("not a1, where its last replica failed"),
        "{placed}"
    );
    assert!(qemus(dir.path()).is_empty(), "the failed VM's QEMU is gone");
}

#[test]
fn a_guest_that_fails_to_boot_is_reported_and_replaced_elsewhere() {
    // A spoilt initramfs: the kernel panics, and QEMU (-no-reboot) exits.
    a_failing_vm_is_placed_elsewhere(
        "initramfs.cpio.gz",
        "60000",
        "QEMU exited while the guest booted",
    );
}

#[test]
fn a_hung_guest_is_killed_reported_and_replaced_elsewhere() {
    // No channel ever appears: the guest waits, and the agent gives up on it after 3 s.
    a_failing_vm_is_placed_elsewhere("no-channel", "3000", "was not ready within 3s");
}

#[test]
fn no_qemu_outlives_its_agent_killed_with_sigkill() {
    let image = guest_image();
    let dir = TempDir::new("qemu-agent-dies");
    let _guard = NoQemuLeft(dir.path().to_path_buf());
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let vms = vm_agent(&control, 2, dir.path(), &image, &["--no-snapshots"]);
    control.wait_agents(1);
    let path = dir.path().join("solo.toml");
    std::fs::write(&path, SOLO).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "vm-solo", 1, 1);
    assert_eq!(qemus(dir.path()).len(), 1);
    std::process::Command::new("kill")
        .args(["-9", &vms.pid().to_string()])
        .status()
        .unwrap();
    // PR_SET_PDEATHSIG: the kernel kills each QEMU as its agent dies.
    let until = Instant::now() + Duration::from_secs(5);
    while !qemus(dir.path()).is_empty() {
        assert!(Instant::now() < until, "QEMU outlived its agent");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A graph asking for a warm VM: the plan tells the VM host to keep one, the agent boots it
/// idle, a replacement replica takes it (placed there because it waits, ready without a
/// boot), the pool refills, and once the graph is gone the idle VMs stop after the idle
/// timeout.
#[test]
fn a_warm_vm_from_the_pool_takes_a_new_replica_without_a_boot() {
    let image = guest_image();
    let dir = TempDir::new("qemu-warm");
    let _guard = NoQemuLeft(dir.path().to_path_buf());
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let data = dir.path().join("a1");
    let vms = vm_agent(
        &control,
        3,
        dir.path(),
        &image,
        &["--memory", "2GiB", "--warm-idle-timeout-ms", "1000"],
    );
    control.wait_agents(1);
    let path = dir.path().join("warm.toml");
    std::fs::write(
        &path,
        format!("{SOLO}\n[scaling]\nmax_replicas = 3\nwarm_vms = 1\n"),
    )
    .unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "vm-solo", 1, 1);
    let ev = events(&control);
    let (_, _, keep) = ev
        .iter()
        .find(|(k, s, _)| k == "warm-pool" && s == "a1")
        .unwrap_or_else(|| panic!("{ev:#?}"));
    assert!(
        keep.contains("keep 1 booted idle VM (1000m CPU, 192MiB)")
            && keep.contains("g1.solo (warm_vms = 1)"),
        "{keep}"
    );
    let idle = |n: usize| {
        let until = Instant::now() + Duration::from_secs(60);
        while vms.log_text().matches("warm VM booted and idle").count() < n {
            assert!(Instant::now() < until, "no warm VM: {}", vms.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    idle(1);
    // The heartbeat tells control the VM waits (`prescient agents` shows it); then the
    // replica's VM dies.
    std::thread::sleep(Duration::from_millis(1500));
    let agents = control.cli_json(&["agents"]);
    let a1 = &agents[0];
    assert_eq!(
        (a1["warm_vms"].as_u64(), a1["warm_target"].as_u64()),
        (Some(1), Some(1)),
        "{agents}"
    );
    let solo = qemus(&data.join("vms/g1.solo.r1"));
    assert_eq!(solo.len(), 1);
    std::process::Command::new("kill")
        .args(["-9", &solo[0].to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let (placed, ready) = loop {
        let ev = events(&control);
        let find = |kind: &str| {
            ev.iter()
                .find(|(k, s, _)| k == kind && s.starts_with("g1.solo.r") && s != "g1.solo.r1")
                .map(|(_, _, r)| r.clone())
        };
        if let (Some(p), Some(r)) = (find("replica-placed"), find("replica-ready")) {
            break (p, r);
        }
        assert!(Instant::now() < until, "no replacement: {ev:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        placed.contains("a warm VM of its shape waits there"),
        "{placed}"
    );
    assert!(
        ready.contains("it took a warm VM from the pool") && ready.contains("deployed in it in"),
        "{ready}"
    );
    let out = control.cli_json(&["invoke", "vm-solo", "--input", "=warm"]);
    assert!(
        out["outputs"]["solo.d"]
            .to_string()
            .contains(&sha256_hex("warm")),
        "{out}"
    );
    // The pool refills to its target.
    idle(2);
    control.cli_ok(&["rm", "vm-solo"]);
    let until = Instant::now() + Duration::from_secs(30);
    while !qemus(dir.path()).is_empty() {
        assert!(
            Instant::now() < until,
            "QEMU still running: {:?}\n{}",
            qemus(dir.path()),
            vms.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ev = events(&control);
    assert!(
        ev.iter()
            .any(|(k, s, r)| k == "warm-pool" && s == "a1" && r.starts_with("keep no idle VMs")),
        "{ev:#?}"
    );
    assert!(
        vms.log_text()
            .contains("idle VM beyond the warm pool's target: stopped"),
        "{}",
        vms.log_text()
    );
}

/// An `exec` task in a microVM: the agent sends the uploaded artifact over the channel, the
/// guest worker checks its digest and runs it (a glibc binary built on this host, on the
/// guest's copy of the C runtime), and invocations come back through it.
#[test]
fn an_uploaded_executable_runs_inside_a_microvm() {
    let image = guest_image();
    let dir = TempDir::new("qemu-exec");
    let _guard = NoQemuLeft(dir.path().to_path_buf());
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let data = dir.path().join("a1");
    let vms = vm_agent(&control, 2, dir.path(), &image, &["--no-snapshots"]);
    control.wait_agents(1);
    let exe = std::path::PathBuf::from(CLI)
        .with_file_name("examples")
        .join("exec_upper");
    assert!(
        exe.exists(),
        "{}: `cargo test` builds the examples",
        exe.display()
    );
    let up = control.cli_json(&["upload", exe.to_str().unwrap()]);
    let digest = up["sha256"].as_str().unwrap().to_string();
    let path = dir.path().join("shout.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "vm-shout"
[[task]]
id = "shout"
code = {{ exec = "{digest}", args = ["BOOM"] }}
inputs = {{ text = "text" }}
outputs = {{ loud = "text" }}
estimate = "1ms"
resources = {{ cpu = "1", memory = "192MiB" }}
"#
        ),
    )
    .unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "vm-shout", 1, 1);
    assert_eq!(qemus(dir.path()).len(), 1, "the replica is a VM");
    let out = control.cli_json(&["invoke", "vm-shout", "--input", "=hello vm"]);
    assert_eq!(out["outputs"]["shout.loud"]["text"], "HELLO VM", "{out}");
    let bad = control.cli(&["invoke", "vm-shout", "--input", "=a BOOM b"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("task shout failed on replica g1.shout.r1: input contains \"BOOM\""),
        "{err}"
    );
    let console = consoles(&data);
    assert!(
        console.contains("task deployed"),
        "{console}\n{}",
        vms.log_text()
    );
}
