//! Failed requests while the proxy is replaced under load: tproxy's
//! `attach --takeover` against HAProxy's seamless reload.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::{PROXY_CLIENT_IFACE, Proxy, SERVER_V4, Topology};

use super::{
    Mode, Options,
    steering::{
        HTTP_PORT, Recipe, Steering, TPROXY_PORT, haproxy_config, start_quiet, wait_for_port,
    },
};

/// Failed requests while the proxy is replaced under load, in each round:
/// ours with `attach --takeover`; HAProxy at its best for this, a seamless
/// reload (`stats socket … expose-fd listeners`, the new process started
/// with `-x` and `-sf`, forced splice), steered by the iptables recipe
/// with `-m socket ! --syn`. Both under `ab -r
/// -c 32` for `seconds` (at least 6), the upgrade a third of the way in.
pub fn rounds(topology: &Topology, work: &Path, options: &Options) -> Result<String> {
    let seconds = options.seconds.max(6);
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        for mode in [Mode::Haproxy, Mode::Ours] {
            eprintln!("bench: upgrade round {round}/{}: {}", options.rounds, mode.name());
            let (done, failed) = upgrade_under_load(topology, mode, work, seconds)
                .with_context(|| format!("upgrade round {round}, {}", mode.name()))?;
            rows.push((mode, done, failed));
        }
    }
    let mut out = format!(
        "Failed requests while the proxy is replaced under load (`ab -r -c 32 -t {seconds}`, \
         `Connection: close`, the upgrade started after {} s), per round:\n\n\
         | upgrade | requests | failed |\n| --- | ---: | ---: |\n",
        seconds / 3
    );
    for (mode, done, failed) in rows {
        let how = match mode {
            Mode::Ours => "tproxy `attach --takeover`",
            _ => "HAProxy reload: `-x` + `-sf`, `expose-fd listeners`, `! --syn`",
        };
        out += &format!("| {how} | {done} | {failed} |\n");
    }
    Ok(out)
}

fn upgrade_under_load(
    topology: &Topology,
    mode: Mode,
    work: &Path,
    seconds: u64,
) -> Result<(u64, u64)> {
    let url = format!("http://{SERVER_V4}:{HTTP_PORT}/");
    let load = {
        let mut ab = topology.client.command("ab");
        ab.args(["-q", "-r", "-c", "32", "-t", &seconds.to_string(), "-n", "10000000", &url]);
        thread::spawn(move || ab.output())
    };
    let upgrade_at = Instant::now() + Duration::from_secs(seconds / 3);
    let pause = || thread::sleep(upgrade_at.saturating_duration_since(Instant::now()));
    match mode {
        Mode::Ours => {
            let args = ["attach", PROXY_CLIENT_IFACE, "--name", "bench-upgrade", "--port", "80"];
            let old =
                Proxy::start_logging(&topology.proxy, &args, "warn,tproxy_user::attach=info")?;
            pause();
            let mut takeover = args.to_vec();
            takeover.push("--takeover");
            let new =
                Proxy::start_logging(&topology.proxy, &takeover, "warn,tproxy_user::attach=info")?;
            let (status, log) = old.wait_exit(Duration::from_secs(120))?;
            ensure!(status.success(), "the old instance: {log}");
            let out = load.join().map_err(|_| anyhow::anyhow!("ab"))??;
            new.stop()?;
            ab_counts(&out.stdout)
        }
        _ => {
            let steering = Steering::recipe_only(topology, Recipe::SynFixed)?;
            let socket = work.join("haproxy-upgrade.sock");
            let conf = work.join("haproxy-upgrade.cfg");
            fs::write(&conf, haproxy_config(Mode::Haproxy, 4096, Some(&socket)))?;
            let haproxy = |extra: &[String]| {
                let mut args = vec!["-db".as_ref(), "-f".as_ref(), conf.as_os_str()];
                args.extend(extra.iter().map(std::ffi::OsStr::new));
                start_quiet(&topology.proxy, "haproxy", &args)
            };
            let mut old = haproxy(&[])?;
            wait_for_port(&topology.proxy, "t", TPROXY_PORT)?;
            pause();
            let mut new = haproxy(&[
                "-x".into(),
                socket.display().to_string(),
                "-sf".into(),
                old.id().to_string(),
            ])?;
            old.wait()?;
            let out = load.join().map_err(|_| anyhow::anyhow!("ab"))??;
            unsafe { libc::kill(new.id() as i32, libc::SIGTERM) };
            new.wait()?;
            drop(steering);
            ab_counts(&out.stdout)
        }
    }
}

/// ab's completed and failed requests (non-2xx answers count as failed).
fn ab_counts(stdout: &[u8]) -> Result<(u64, u64)> {
    let text = String::from_utf8_lossy(stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let done = field("Complete requests:").context("no Complete requests in ab's output")?;
    let failed = field("Failed requests:").unwrap_or(0) + field("Non-2xx responses:").unwrap_or(0);
    Ok((done, failed))
}
