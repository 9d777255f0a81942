//! `cargo xtask vm-test`: the integration tests inside other kernels.
//!
//! For each kernel: fetch Debian's generic (not -cloud-, which lacks 9p)
//! `linux-image-*-amd64-unsigned` package, cache it under `target/vm`,
//! index its modules where they were unpacked (virtme-ng loads them from
//! there), boot it under qemu's TCG
//! (KVM does not work on our machines) with the host's filesystem visible,
//! and run the test binaries built on the host. A kernel that does not boot
//! is a failure.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// A kernel series of the matrix and how to find its newest package.
pub struct Series {
    pub name: &'static str,
    /// `apt-cache search --names-only` pattern.
    pattern: &'static str,
    /// An apt source line for a series this distribution does not carry;
    /// it is used through a private apt state under `target/vm`, so the
    /// host's apt configuration is never touched.
    source: Option<&'static str>,
}

pub const SERIES: &[Series] = &[
    Series { name: "6.1", pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$", source: None },
    Series {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$",
        source: None,
    },
    // Debian 11, the oldest kernel still common in production.
    Series {
        name: "5.10",
        pattern: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
        source: Some(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main",
        ),
    },
];

/// `apt-get`/`apt-cache` options that use `series`' own source, if it has one.
fn apt_options(root: &Path, series: &Series) -> Result<Vec<String>> {
    let Some(source) = series.source else { return Ok(Vec::new()) };
    let dir = root.join(format!("apt-{}", series.name));
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    fs::write(dir.join("sources.list"), format!("{source}\n"))?;
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", dir.join("sources.list").display()),
        "-oDir::Etc::SourceParts=/dev/null".to_owned(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
    ])
}

/// One kernel's outcome.
struct Outcome {
    kernel: String,
    passed: usize,
    failed: usize,
    wall: Duration,
    error: Option<String>,
}

pub fn run(series: &[&Series], binaries: &TestBinaries) -> Result<()> {
    let root = super::workspace().join("target/vm");
    fs::create_dir_all(&root)?;
    let mut outcomes = Vec::new();
    for s in series {
        let started = Instant::now();
        let outcome = match boot_and_test(&root, s, binaries) {
            Ok((kernel, passed, failed, error)) => {
                Outcome { kernel, passed, failed, wall: started.elapsed(), error }
            }
            Err(e) => Outcome {
                kernel: s.name.to_owned(),
                passed: 0,
                failed: 0,
                wall: started.elapsed(),
                error: Some(format!("{e:#}")),
            },
        };
        outcomes.push(outcome);
    }
    println!("\n| kernel | passed | failed | wall time | result |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for o in &outcomes {
        let result = match &o.error {
            None => "ok".to_owned(),
            Some(e) => format!("FAILED: {e}"),
        };
        println!(
            "| {} | {} | {} | {:.0} s | {result} |",
            o.kernel,
            o.passed,
            o.failed,
            o.wall.as_secs_f64()
        );
    }
    let bad: Vec<&str> =
        outcomes.iter().filter(|o| o.error.is_some()).map(|o| o.kernel.as_str()).collect();
    ensure!(bad.is_empty(), "the tests failed on {}", bad.join(", "));
    Ok(())
}

/// The host-built test binaries and what they need.
pub struct TestBinaries {
    pub tests: Vec<(String, PathBuf)>,
    pub tproxy_user: PathBuf,
    pub examples: PathBuf,
}

fn boot_and_test(
    root: &Path,
    series: &Series,
    binaries: &TestBinaries,
) -> Result<(String, usize, usize, Option<String>)> {
    let (version, vmlinuz) = fetch_kernel(root, series)?;
    let results = root.join("results").join(&version);
    let _ = fs::remove_dir_all(&results);
    fs::create_dir_all(&results)?;
    let script = results.join("guest-tests.sh");
    fs::write(&script, guest_script(binaries))?;
    eprintln!("vm-test: booting {version} under TCG and running the tests (several minutes)");
    let vng = root.join("venv/bin/vng");
    // The guest sees the host's root filesystem, but mounts its own /tmp
    // and /run: a checkout under /tmp must be passed in explicitly. The
    // binaries and the (writable) results must not nest, or one mount
    // hides the other.
    let mut guest = Command::new(&vng);
    guest
        .args(["--disable-kvm", "--memory", "2G", "--cpus", "2"])
        .arg(format!("--rodir={}", super::workspace().join("target/debug").display()))
        .arg(format!("--rwdir={}", results.display()))
        .arg("--run")
        .arg(&vmlinuz)
        .arg("--exec")
        .arg(format!("sh {} {}", script.display(), results.display()))
        // vng finds virtme-run next to itself.
        .env("PATH", format!("{}:{}", vng.parent().unwrap().display(), std::env::var("PATH")?));
    let run = run_bounded(guest, guest_timeout())
        .with_context(|| format!("running {}", vng.display()))?;
    for line in &run.console {
        println!("  | {line}");
    }
    let Some(status) = run.status else {
        // The guest's last words, and the end of the test log it was in.
        let current = run.console.iter().rev().find_map(|l| l.strip_prefix("== "));
        let mut why = format!(
            "the guest did not finish within {} s (TPROXY_VM_TIMEOUT); it was in {}",
            guest_timeout().as_secs(),
            current.unwrap_or("no test binary yet")
        );
        if let Some(name) = current {
            let log = fs::read_to_string(results.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            for line in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("vm-test {version}: {name}: | {line}");
            }
            why += &format!(" (its log: {})", results.join(format!("{name}.log")).display());
        }
        return Ok((version, 0, 0, Some(why)));
    };
    let (mut passed, mut failed, mut seen) = (0, 0, 0);
    let mut problems = Vec::new();
    for (name, _) in &binaries.tests {
        let log = fs::read_to_string(results.join(format!("{name}.log"))).unwrap_or_default();
        let Some(summary) = log.lines().rev().find(|l| l.starts_with("test result:")) else {
            problems.push(format!("{name}: no result"));
            continue;
        };
        seen += 1;
        passed += count(summary, " passed");
        failed += count(summary, " failed");
        for line in log.lines().filter(|l| l.ends_with("... FAILED")) {
            eprintln!("vm-test {version}: {name}: {line}");
        }
        if summary.contains("FAILED") {
            // CI keeps only the console: the failures' own words go there.
            for line in failure_text(&log).take(80) {
                eprintln!("vm-test {version}: {name}: | {line}");
            }
            eprintln!(
                "vm-test {version}: the {name} log is {}",
                results.join(format!("{name}.log")).display()
            );
        }
    }
    let error = if seen == 0 {
        Some(format!("the kernel did not run the tests (vng exited with {status})"))
    } else if !status.success() || failed > 0 || !problems.is_empty() {
        Some(format!("{failed} failed {}", problems.join(", ")).trim().to_owned())
    } else {
        None
    };
    Ok((version, passed, failed, error))
}

/// How long one kernel may take, boot and every test binary, before the
/// guest counts as hung: TCG runs them in about 21 minutes on an idle
/// machine of two cores, and half as fast again when the host is busy, so
/// twice that. `TPROXY_VM_TIMEOUT` overrides it, in seconds.
fn guest_timeout() -> Duration {
    let given = std::env::var("TPROXY_VM_TIMEOUT").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(given.unwrap_or(45 * 60))
}

/// What a bounded run printed, and how it ended (`None`: killed at the
/// bound).
struct BoundedRun {
    console: Vec<String>,
    status: Option<std::process::ExitStatus>,
}

/// Runs `command` in its own process group and kills the group (vng,
/// virtme and qemu) if it has not ended within `limit`.
fn run_bounded(mut command: Command, limit: Duration) -> Result<BoundedRun> {
    use std::os::unix::process::CommandExt as _;
    // Through pipes: given our stdout itself, the console output of the
    // guest clobbered a log file it was redirected to.
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let group = child.id() as i32;
    let readers = [
        read_all(child.stdout.take().context("stdout")?),
        read_all(child.stderr.take().context("stderr")?),
    ];
    let (ended, end) = std::sync::mpsc::channel();
    std::thread::spawn(move || ended.send(child.wait()));
    let status = match end.recv_timeout(limit) {
        Ok(status) => Some(status?),
        Err(_) => {
            // SAFETY: kill(2) on the process group this function made.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            end.recv().context("waiting for the killed guest")??;
            None
        }
    };
    let mut console = Vec::new();
    for reader in readers {
        let text = reader.join().unwrap_or_default();
        for line in String::from_utf8_lossy(&text).lines() {
            let line = line.trim_matches(|c: char| c.is_whitespace() || c.is_control());
            if !line.is_empty() {
                console.push(line.to_owned());
            }
        }
    }
    Ok(BoundedRun { console, status })
}

fn read_all(mut from: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = from.read_to_end(&mut all);
        all
    })
}

/// libtest's `failures:` section: each failed test's output and panic.
fn failure_text(log: &str) -> impl Iterator<Item = &str> {
    log.lines()
        .skip_while(|l| *l != "failures:")
        .skip(1)
        .take_while(|l| *l != "failures:")
        .filter(|l| !l.is_empty())
}

/// `N passed` in a libtest summary line.
fn count(summary: &str, what: &str) -> usize {
    summary
        .split(';')
        .find(|part| part.ends_with(what))
        .and_then(|part| part.trim_end_matches(what).rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn guest_script(binaries: &TestBinaries) -> String {
    let mut script = format!(
        "#!/bin/sh\n# Runs inside the guest: every test binary, each log into $1.\n\
         export TPROXY_USER_BIN={} TPROXY_EXAMPLES_DIR={} RUST_BACKTRACE=0\n\
         # TCG is 20 times slower: the host runs the 10 000-connection load.\n\
         export TPROXY_LOAD_CONNECTIONS=2000\n\
         status=0\nuname -r\n",
        binaries.tproxy_user.display(),
        binaries.examples.display()
    );
    for (name, path) in &binaries.tests {
        script += &format!(
            "echo \"== {name}\"\n{} --test-threads 2 --show-output > \"$1/{name}.log\" 2>&1 || status=1\ngrep '^test result' \"$1/{name}.log\"\n",
            path.display()
        );
    }
    script += "exit $status\n";
    script
}

/// Downloads (once) and unpacks the newest package of `series`, and indexes
/// its modules in place. Returns the kernel version and its vmlinuz.
fn fetch_kernel(root: &Path, series: &Series) -> Result<(String, PathBuf)> {
    let apt = apt_options(root, series)?;
    let package = newest_package(series, &apt)?;
    let dir = root.join("kernels").join(&package);
    let stamp = dir.join(".unpacked");
    if !stamp.exists() {
        fs::create_dir_all(&dir)?;
        eprintln!("vm-test: downloading {package}");
        super::run(
            Command::new("apt-get").args(&apt).arg("download").arg(&package).current_dir(&dir),
        )?;
        let deb = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        super::run(Command::new("dpkg").arg("-x").arg(&deb).arg(dir.join("root")))?;
        fs::remove_file(&deb)?;
        fs::write(&stamp, "")?;
    }
    let modules = dir.join("root/lib/modules");
    let version = fs::read_dir(&modules)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the package has no modules")?;
    // virtme-ng finds the modules beside the kernel image (the package's own
    // lib/modules), so the host's /lib/modules is never touched; it may not
    // even exist on a new machine.
    if !modules.join(&version).join("modules.dep").exists() {
        super::run(Command::new("depmod").arg("-b").arg(dir.join("root")).arg(&version))?;
    }
    let vmlinuz = dir.join("root/boot").join(format!("vmlinuz-{version}"));
    ensure!(vmlinuz.exists(), "no {}", vmlinuz.display());
    Ok((version, vmlinuz))
}

/// The newest package matching the series, refreshing apt's lists if none does.
fn newest_package(series: &Series, apt: &[String]) -> Result<String> {
    for attempt in 0..2 {
        let out = Command::new("apt-cache")
            .args(apt)
            .args(["search", "--names-only", series.pattern])
            .output()
            .context("running apt-cache")?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        names.sort_by_key(|n| version_key(n));
        if let Some(newest) = names.pop() {
            return Ok(newest);
        }
        if attempt == 0 {
            super::run(Command::new("apt-get").args(apt).args(["update", "-qq"]))?;
        }
    }
    bail!("no Debian package for kernel {} (pattern {})", series.name, series.pattern)
}

/// The numbers in a package name, for ordering versions.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_past_its_bound_is_killed_with_what_it_printed() {
        let mut hung = Command::new("sh");
        hung.args(["-c", "echo '== udp'; sleep 600 & wait"]);
        let started = Instant::now();
        let run = run_bounded(hung, Duration::from_secs(1)).unwrap();
        assert!(run.status.is_none());
        assert_eq!(run.console, ["== udp"]);
        // The whole group went: the sleep held the pipe too.
        assert!(started.elapsed() < Duration::from_secs(60));
        let mut done = Command::new("sh");
        done.args(["-c", "echo fine; exit 3"]);
        let run = run_bounded(done, Duration::from_secs(60)).unwrap();
        assert_eq!(run.status.and_then(|s| s.code()), Some(3));
        assert_eq!(run.console, ["fine"]);
    }
}
