//! Where the relay's time goes under the connection-rate load: a flame
//! graph (perf, folded and drawn by inferno) and the system calls per
//! relayed connection (strace -c).

use std::{
    fs,
    io::BufReader,
    path::Path,
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail, ensure};
use inferno::collapse::Collapse as _;
use tproxy_tests::Topology;

use super::{
    Mode,
    measure::{self, Http},
    steering::Steering,
};

pub const FLAME_GRAPH: &str = "flamegraph.svg";
const SECONDS: u64 = 5;

/// Profiles `ours` under `ab -c 32` with a new connection per request;
/// writes the flame graph into `figures` and returns the report's text.
pub fn run(topology: &Topology, work: &Path, figures: &Path) -> Result<String> {
    let steering = Steering::start(topology, Mode::Ours, work)?;
    let pid = steering.relay_pid().context("ours has a relay")?;
    fs::create_dir_all(figures)?;
    flame_graph(topology, pid, work, &figures.join(FLAME_GRAPH))?;
    let client = &topology.client;
    let per_connection = syscalls_per(pid, work, "connection", || {
        Ok(measure::http_close(client, SECONDS, work)?.requests)
    })?;
    let per_exchange =
        syscalls_per(pid, work, "exchange", || Ok(measure::udp_rate(client, SECONDS)?.1))?;
    drop(steering);
    Ok(format!(
        "The relay (`ours`) under that load (`ab -c 32`, a new connection per request): \
         [flame graph]({}/{FLAME_GRAPH}) (perf at 999 Hz, kernel and user stacks), and \
         its system calls per relayed connection (`strace -c -f` for {SECONDS} s, divided by \
         the requests ab completed meanwhile):\n\n{per_connection}\n\
         And per UDP request/response exchange, under the 8-socket lockstep load:\n\n{per_exchange}",
        super::report::FIGURES
    ))
}

/// Runs ab for `SECONDS` in the client namespace while `during` runs.
fn under_load<T>(
    topology: &Topology,
    work: &Path,
    during: impl FnOnce() -> T,
) -> Result<(Http, T)> {
    let client = &topology.client;
    thread::scope(|s| {
        let load = s.spawn(|| measure::http_close(client, SECONDS, work));
        let out = during();
        let http = load.join().map_err(|_| anyhow::anyhow!("ab panicked"))??;
        Ok((http, out))
    })
}

fn flame_graph(topology: &Topology, pid: u32, work: &Path, svg: &Path) -> Result<()> {
    let data = work.join("perf.data");
    let (_, recorded) = under_load(topology, work, || {
        Command::new("perf")
            .args(["record", "-F", "999", "-g", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string(), "--", "sleep", &(SECONDS - 1).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    })?;
    ensure!(recorded.context("running perf record")?.success(), "perf record failed");
    let script = Command::new("perf")
        .arg("script")
        .arg("-i")
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("running perf script")?;
    ensure!(script.status.success(), "perf script failed");
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(BufReader::new(&script.stdout[..]), &mut folded)
        .context("folding perf's stacks")?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = "tproxy relay, new connection per request (ab -c 32)".into();
    let file = fs::File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
    inferno::flamegraph::from_reader(&mut options, &folded[..], file)
        .context("drawing the flame graph")?;
    Ok(())
}

/// strace's per-call counts while `load` runs, over the units of work it
/// reports (connections, exchanges), as a table, largest first.
fn syscalls_per(
    pid: u32,
    work: &Path,
    unit: &str,
    load: impl FnOnce() -> Result<u64>,
) -> Result<String> {
    let output = work.join("strace.txt");
    let mut strace = Command::new("strace");
    strace.args(["-c", "-f", "-o"]).arg(&output);
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        strace.arg("-p").arg(task?.file_name());
    }
    let mut strace = strace.stderr(Stdio::null()).spawn().context("starting strace")?;
    let units = load();
    // strace prints its summary when it detaches.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    strace.wait()?;
    let units = units?;
    ensure!(units > 0, "no {unit} completed under strace");
    let summary = fs::read_to_string(&output)?;
    let mut calls: Vec<(String, u64, u64)> = Vec::new();
    // "% time seconds usecs/call calls [errors] syscall", errors may be blank.
    for line in summary.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[0].parse::<f64>().is_err() {
            continue;
        }
        let name = fields[fields.len() - 1].to_owned();
        let count: u64 = fields[3].parse().unwrap_or(0);
        let errors = if fields.len() == 6 { fields[4].parse().unwrap_or(0) } else { 0 };
        calls.push((name, count, errors));
    }
    let Some(total) = calls.iter().find(|c| c.0 == "total").map(|c| c.1) else {
        bail!("no total in strace's summary")
    };
    let per = |n: u64| n as f64 / units as f64;
    let mut out = format!(
        "| system call | per {unit} | of which failed |\n| --- | ---: | ---: |\n\
         | all | {:.1} | |\n",
        per(total)
    );
    calls.retain(|c| c.0 != "total" && per(c.1) >= 0.05);
    calls.sort_by_key(|c| std::cmp::Reverse(c.1));
    for (name, count, errors) in calls {
        out += &format!("| `{name}` | {:.2} | {:.2} |\n", per(count), per(errors));
    }
    Ok(out)
}
