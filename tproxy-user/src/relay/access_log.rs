//! The access log (`--access-log`): one JSON object per line for every
//! relayed TCP connection and UDP session, written when it ends, as
//! HAProxy's and Envoy's access logs are. A bounded queue stands between the
//! relays and a writer thread: the relays never wait on the disk, and an
//! entry that does not fit is dropped and counted.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::Ordering::Relaxed,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::warn;

use crate::{
    error::{Error, Result},
    relay::RelaySettings,
    rules::{Protocol, RuleSet},
};

/// Entries waiting for the writer; past it they are dropped.
const QUEUE: usize = 8192;

crate::counters::counters! {
    /// The access log's counters.
    AccessLogStats =>
    /// A snapshot of [`AccessLogStats`].
    AccessLogCounters {
        /// Entries written.
        written: Counter("tproxy_access_log_entries" outcome = "written", "entries written",
            "Access log entries, by what became of them"),
        /// Entries dropped because the writer fell behind.
        dropped: Counter("tproxy_access_log_entries" outcome = "dropped", "entries dropped",
            "Access log entries, by what became of them"),
    }
}

/// One relayed connection or session, as written.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When it started, in seconds since the Unix epoch.
    pub start: f64,
    /// How long it lasted, in seconds.
    pub duration: f64,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The original destination.
    pub destination: SocketAddr,
    /// The rule that decided it, as it ended (none: the relay was reached
    /// another way, or the rule is gone).
    pub rule: Option<String>,
    /// `direct`, or the upstream proxy's name (`default` for `--upstream
    /// URL`).
    pub upstream: String,
    /// Bytes from the client.
    pub bytes_up: u64,
    /// Bytes to the client.
    pub bytes_down: u64,
    /// `closed`, `reset`, `timeout`, `upstream_failed`, `expired`,
    /// `evicted`, `shutting_down`…
    pub outcome: String,
}

impl Entry {
    /// An entry for a flow of `protocol` from `client` to `destination`,
    /// direct and decided by no rule until [`Entry::routed`] says otherwise.
    pub fn new(protocol: Protocol, client: SocketAddr, destination: SocketAddr) -> Self {
        Self {
            start: 0.0,
            duration: 0.0,
            protocol: match protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            },
            client,
            destination,
            rule: None,
            upstream: "direct".into(),
            bytes_up: 0,
            bytes_down: 0,
            outcome: String::new(),
        }
    }

    /// The rule that decides the flow and the upstream it takes.
    pub fn routed(mut self, settings: &RelaySettings, rules: Option<&RuleSet>) -> Self {
        let proto = if self.protocol == "tcp" { Protocol::Tcp } else { Protocol::Udp };
        let (src, dst) = (self.client, self.destination);
        let rule = rules.and_then(|r| r.deciding(proto, src.ip(), dst.ip(), dst.port()));
        let upstream = settings.upstreams.for_flow(rules, proto, src, dst);
        // UDP goes through SOCKS5 only; through any other, directly.
        if upstream.is_some_and(|u| proto == Protocol::Tcp || u.carries_udp()) {
            self.upstream = rule.and_then(|r| r.via.clone()).unwrap_or_else(|| "default".into());
        }
        self.rule = rule.map(|r| r.to_string());
        self
    }

    /// Its end: how long it lasted, the bytes and the outcome (the words
    /// before a colon, with underscores: "evicted: the table is full" is
    /// `evicted`).
    pub fn ended(mut self, duration: Duration, up: u64, down: u64, outcome: &str) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.start = now.saturating_sub(duration).as_secs_f64();
        self.duration = duration.as_secs_f64();
        self.bytes_up = up;
        self.bytes_down = down;
        let words = outcome.split(':').next().unwrap_or(outcome).trim();
        self.outcome = words.replace(' ', "_");
        self
    }
}

enum Command {
    Write(Box<Entry>),
    Reopen,
    /// Everything queued before is written and flushed: reply.
    Flush(SyncSender<()>),
}

/// Where entries go, shared by the relays; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    queue: SyncSender<Command>,
    stats: Arc<AccessLogStats>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("stats", &self.stats.snapshot()).finish()
    }
}

impl AccessLog {
    /// Opens `path` for appending (created 0640; `-` is standard output)
    /// and starts the writer. Fails now if the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self> {
        let out = Output::open(path)?;
        let (queue, entries) = sync_channel(QUEUE);
        let stats = Arc::new(AccessLogStats::default());
        let written = stats.clone();
        let path = path.to_owned();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_until_closed(out, &path, &entries, &written))
            .map_err(|e| Error::io("starting the access log's writer", e))?;
        Ok(Self { queue, stats })
    }

    /// Queues `entry`; if the writer is that far behind, drops and counts it.
    pub fn record(&self, entry: Entry) {
        match self.queue.try_send(Command::Write(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Has the writer open the path again (after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.queue.try_send(Command::Reopen);
    }

    /// Waits (a few seconds at most) until what was queued so far is
    /// written and flushed: before the process exits.
    pub fn flush(&self) {
        let (done, flushed) = sync_channel(1);
        if self.queue.send(Command::Flush(done)).is_ok() {
            let _ = flushed.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Its counters.
    pub fn counters(&self) -> AccessLogCounters {
        self.stats.snapshot()
    }
}

/// The file, or standard output.
enum Output {
    File(BufWriter<File>),
    Stdout(BufWriter<io::Stdout>),
}

impl Output {
    fn open(path: &Path) -> Result<Self> {
        if path == Path::new("-") {
            return Ok(Self::Stdout(BufWriter::new(io::stdout())));
        }
        // Never through a symlink: the path's directory may be one another
        // user can write (/tmp, /var/log/<app>).
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(format!("opening the access log {}", path.display()), e))?;
        Ok(Self::File(BufWriter::new(file)))
    }

    fn writer(&mut self) -> &mut dyn io::Write {
        match self {
            Self::File(w) => w,
            Self::Stdout(w) => w,
        }
    }
}

/// Writes what comes until every sender is gone, flushing whenever the
/// queue runs dry.
fn write_until_closed(
    mut out: Output,
    path: &Path,
    entries: &Receiver<Command>,
    stats: &AccessLogStats,
) {
    let mut next = entries.recv().ok();
    while let Some(command) = next {
        match command {
            Command::Write(entry) => {
                let line = serde_json::to_string(&entry).unwrap_or_default();
                match writeln!(out.writer(), "{line}") {
                    Ok(()) => stats.written.fetch_add(1, Relaxed),
                    Err(_) => stats.dropped.fetch_add(1, Relaxed),
                };
            }
            Command::Flush(done) => {
                if let Err(e) = out.writer().flush() {
                    warn!("writing the access log: {e}");
                }
                let _ = done.send(());
            }
            Command::Reopen => {
                let _ = out.writer().flush();
                match Output::open(path) {
                    Ok(reopened) => out = reopened,
                    Err(e) => warn!("{e}; the access log goes on in the file it had"),
                }
            }
        }
        next = match entries.try_recv() {
            Ok(command) => Some(command),
            Err(_) => {
                if let Err(e) = out.writer().flush() {
                    warn!("writing the access log: {e}");
                }
                entries.recv().ok()
            }
        };
    }
    let _ = out.writer().flush();
}
