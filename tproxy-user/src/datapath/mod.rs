//! The kernel side: loading the TC program and the cgroup hooks, attaching
//! them and owning their maps ([`Datapath`]), the policy routing that
//! delivers steered packets locally ([`routing`]), the map of the host's own
//! destinations ([`local_table`]), and the original destinations of the
//! host's own connections ([`original_dst`]).

mod filters;
pub mod local_table;
pub mod original_dst;
pub mod routing;
mod settings;

pub use filters::{
    NetlinkFilter, remove_clsact_if_unused, remove_filter, remove_unrecorded_filters,
};
pub use settings::{PortTarget, Settings, Target, Unparsed};

use std::os::fd::AsRawFd;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, SockMap,
        lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, Link as _, ProgramError, SchedClassifier,
        SkLookup, SockOps, TcAttachType, tc, tc::SchedClassifierLink,
    },
    util::nr_cpus,
};
use tproxy_ebpf::{ParseTrace, RuleAction, RuleMatch, RuleStats, gate_index, names, stat};
use tracing::{debug, warn};

use crate::{
    error::{Error, Result},
    host::system::LinkKind,
    rules::TrieEntry,
};

/// The TC program, built by build.rs from the tproxy-ebpf crate.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy"));

crate::counters::counters! {
    /// Counters kept by the TC program, summed over all CPUs. The fields
    /// follow the program's `stat` indices, in order.
    DatapathStats {
        /// Packets handed to the listener (the relay's, or `--to-port`'s): the
        /// first packets of new flows.
        to_listener: Counter("tproxy_datapath_packets" path = "listener", "packets to the listener",
            "Packets steered by the TC program, by where they went"),
        /// Packets handed to a socket that already owned their tuple.
        to_socket: Counter("tproxy_datapath_packets" path = "socket", "to existing sockets",
            "Packets steered by the TC program, by where they went"),
        /// Matched packets passed untouched because no listener was there.
        no_listener: Counter("tproxy_datapath_no_listener", "passed without a listener",
            "Matched packets passed without a listener (fail-open)"),
        /// Packets whose `bpf_sk_assign` failed; they passed untouched.
        assign_failed: Counter("tproxy_datapath_assign_failed", "assign failures",
            "bpf_sk_assign failures"),
        /// SYNs that met a TIME_WAIT socket holding their tuple.
        tw_syn: Counter("tproxy_datapath_time_wait_syns", "SYNs met TIME_WAIT",
            "SYNs that met a TIME_WAIT socket"),
        /// Of those, the ones handed straight to the listener.
        tw_handover: Counter("tproxy_datapath_time_wait_handovers", "handed over",
            "Of those, handed to the listener"),
        /// Replies steered back to the relay's spoofed upstream sockets.
        return_path: Counter("tproxy_datapath_packets" path = "spoofed_socket", "replies to spoofed sockets",
            "Packets steered by the TC program, by where they went"),
        /// Packets on intercepted ports to this host's own destinations, left to
        /// the host.
        to_host: Counter("tproxy_datapath_to_host", "left to this host",
            "Packets on intercepted ports to this host's own destinations, left to the host"),
        /// ICMP errors about packets of the relay's sockets, delivered to them.
        icmp_to_socket: Counter("tproxy_datapath_icmp_to_socket", "ICMP errors to sockets",
            "ICMP errors about packets of the relay's sockets, delivered to them"),
        /// Packets possibly for an intercepted port that could not be parsed
        /// whole (first fragments, long IPv6 chains), passed.
        unparsed_passed: Counter("tproxy_datapath_unparsed" action = "pass", "unparsed passed",
            "Packets possibly for an intercepted port that could not be parsed whole, by what was done"),
        /// The same, dropped (`--unparsed drop`).
        unparsed_dropped: Counter("tproxy_datapath_unparsed" action = "drop", "unparsed dropped",
            "Packets possibly for an intercepted port that could not be parsed whole, by what was done"),
        /// Connections and unconnected datagrams of processes in `--cgroup`
        /// sent to the relay (or `--to-port`) instead of their destination.
        cgroup_to_target: Counter("tproxy_cgroup_redirects" outcome = "target", "cgroup redirects",
            "Connections and unconnected sends of the host's own processes a rule intercepts, by what was done"),
        /// The same, left to go to their destination because no target was
        /// there (fail-open).
        cgroup_no_target: Counter("tproxy_cgroup_redirects" outcome = "no_target", "cgroup without target",
            "Connections and unconnected sends of the host's own processes a rule intercepts, by what was done"),
        /// Packets and connections on intercepted ports passed because the
        /// host's own destinations were incomplete in the datapath and
        /// nothing could say theirs is not one (fail-safe).
        local_unknown: Counter("tproxy_datapath_local_unknown", "passed with locality unknown",
            "Packets and connections on intercepted ports passed while the host's own destinations were incomplete"),
        /// New flows dropped because the `--to-port` listener that met them
        /// was not its owner's.
        target_foreign: Counter("tproxy_datapath_target_foreign", "dropped at a foreign listener",
            "New flows dropped because the --to-port listener on the port was another user's"),
    }
}

const _: () = assert!(
    <DatapathStats as crate::counters::Snapshot>::COUNTERS.len() == stat::COUNT as usize,
    "a datapath counter without a description, or one too many"
);

/// What [`Datapath::attach`] added.
#[derive(Debug)]
pub struct Attached {
    /// The netlink filter (kernels before 6.6).
    pub filter: Option<NetlinkFilter>,
    /// Whether the clsact qdisc was created for it.
    pub created_qdisc: bool,
}

/// The loaded TC program and its maps. Dropping it detaches the program
/// from every interface it was attached to.
pub struct Datapath {
    /// Detached when dropped, before the program goes.
    links: Vec<SchedClassifierLink>,
    ebpf: Ebpf,
    /// Whether the `sk_lookup` program loaded (kernels 5.9 and later).
    reopen_loaded: bool,
    /// Which copy of the rule trie the program reads.
    active_rules: u32,
    /// Most entries of `LOCAL_DESTS`.
    local_dests_capacity: u32,
}

impl Datapath {
    /// Loads the embedded programs through the verifier with `settings`;
    /// attaches nothing.
    ///
    /// This needs no async runtime, so a program can load first and then
    /// drop the capabilities only loading needs (CAP_PERFMON, or
    /// CAP_SYS_ADMIN) before it starts any thread.
    pub fn load(settings: &Settings) -> Result<Self> {
        let flag = u32::from;
        let (return_path, intercept_local, drop_unparsed, trace) = (
            flag(settings.return_path),
            flag(settings.intercept_local),
            flag(settings.unparsed == Unparsed::Drop),
            flag(settings.trace),
        );
        let target = match settings.target {
            Target::Relay => None,
            Target::Port(t) => Some(t),
        };
        // 0: the relay's sockets.
        let target_port = target.map_or(0, |t| u32::from(t.port));
        let target_owner = target.map_or(0, |t| t.owner.unwrap_or(u32::MAX));
        // Network order, as the program compares them with packets.
        let target_ipv4 = target.and_then(|t| t.ipv4).map_or(0, |a| u32::from_ne_bytes(a.octets()));
        let target_ipv6: [u32; 4] = target.and_then(|t| t.ipv6).map_or([0; 4], original_dst::words);
        let local_dests_capacity = match settings.local_dests_capacity {
            0 => tproxy_ebpf::MAX_LOCAL_DESTS,
            n => n,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::MARK, &settings.mark, true)
            .override_global(names::BYPASS_MARK, &settings.upstream_mark, true)
            .override_global(names::RETURN_PATH, &return_path, true)
            .override_global(names::INTERCEPT_LOCAL, &intercept_local, true)
            .override_global(names::DROP_UNPARSED, &drop_unparsed, true)
            .override_global(names::TRACE_PARSE, &trace, true)
            .override_global(names::TARGET_PORT, &target_port, true)
            .override_global(names::TARGET_OWNER, &target_owner, true)
            .override_global(names::TARGET_ADDR4, &target_ipv4, true)
            .override_global(names::TARGET_ADDR6, &target_ipv6, true)
            .override_global(names::NETNS_COOKIE, &settings.netns_cookie, true)
            .map_max_entries(names::LOCAL_DESTS, local_dests_capacity)
            .load(PROGRAM_OBJECT)
            .map_err(Error::Load)?;
        for (wanted, name) in
            [(settings.ethernet_links, names::PROGRAM), (settings.l3_links, names::PROGRAM_L3)]
        {
            if wanted {
                program_mut(&mut ebpf, name)?.load().map_err(load_error(name))?;
            }
        }
        if settings.cgroup_hooks {
            for name in names::CGROUP_PROGRAMS {
                cgroup_program(&mut ebpf, name)?.load().map_err(load_error(name))?;
            }
        }
        if settings.original_dst_answers {
            let name = names::SOCKOPS_PROGRAM;
            typed::<SockOps>(&mut ebpf, name)?.load().map_err(load_error(name))?;
            let name = names::GETSOCKOPT_PROGRAM;
            typed::<CgroupSockopt>(&mut ebpf, name)?.load().map_err(load_error(name))?;
        }
        let reopen_loaded = match reopen_program(&mut ebpf)?.load() {
            Ok(()) => true,
            Err(e) => {
                debug!("sk_lookup program: {e}");
                false
            }
        };
        Ok(Self { links: Vec::new(), ebpf, reopen_loaded, active_rules: 0, local_dests_capacity })
    }

    /// How many instructions the verifier explored to accept each loaded TC
    /// program (Ethernet, then L3), as the kernel reports it (5.16 and
    /// later; `None` before). Every start pays for this exploration, so a
    /// change that multiplies the paths shows here first.
    pub fn verifier_work(&self) -> Vec<(&'static str, Option<u32>)> {
        [("Ethernet", names::PROGRAM), ("L3", names::PROGRAM_L3)]
            .into_iter()
            .filter_map(|(kind, name)| {
                let program: &SchedClassifier = self.ebpf.program(name)?.try_into().ok()?;
                let info = program.info().ok()?;
                Some((kind, info.verified_instruction_count()))
            })
            .collect()
    }

    /// Attaches the `sk_lookup` program that lets a SYN reopen a tuple held
    /// in TIME_WAIT, to the current network namespace. Without it (kernels
    /// before 5.9) such a SYN is answered by TIME_WAIT, and the client's
    /// retry a second later gets through.
    pub fn attach_reopen(&mut self) -> Result<()> {
        if !self.reopen_loaded {
            return Err(crate::host::kernel::SK_LOOKUP.missing());
        }
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| Error::io("opening /proc/thread-self/ns/net", e))?;
        reopen_program(&mut self.ebpf)?.attach(netns).map_err(|source| Error::Attach {
            iface: "the network namespace (sk_lookup)".into(),
            source,
        })?;
        Ok(())
    }

    /// Attaches the cgroup hooks to `cgroup`, beside any other programs
    /// there. The links die with this process: nothing outlives it.
    pub fn attach_cgroup(&mut self, cgroup: &crate::host::cgroup::Cgroup) -> Result<()> {
        for name in names::CGROUP_PROGRAMS {
            // A cgroup link always runs beside the others (the kernel
            // refuses BPF_F_ALLOW_MULTI on links: it is implied).
            cgroup_program(&mut self.ebpf, name)?
                .attach(&cgroup.dir, CgroupAttachMode::Single)
                .map_err(|source| Error::Attach {
                    iface: cgroup.path.display().to_string(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Records the rewritten TCP sockets of `clients` (the cgroups given to
    /// [`Self::attach_cgroup`]) by their local address, and answers
    /// `getsockopt(SO_ORIGINAL_DST)` for the processes of `proxy` on the
    /// sockets they accept from them, as iptables REDIRECT does.
    pub fn attach_original_dst_answers(
        &mut self,
        clients: &[crate::host::cgroup::Cgroup],
        proxy: &crate::host::cgroup::Cgroup,
    ) -> Result<()> {
        let failed = |cgroup: &crate::host::cgroup::Cgroup| {
            let iface = cgroup.path.display().to_string();
            move |source| Error::Attach { iface, source }
        };
        for cgroup in clients {
            typed::<SockOps>(&mut self.ebpf, names::SOCKOPS_PROGRAM)?
                .attach(&cgroup.dir, CgroupAttachMode::Single)
                .map_err(failed(cgroup))?;
        }
        typed::<CgroupSockopt>(&mut self.ebpf, names::GETSOCKOPT_PROGRAM)?
            .attach(&proxy.dir, CgroupAttachMode::Single)
            .map_err(failed(proxy))?;
        Ok(())
    }

    /// Where the cgroup hooks send what a rule intercepts, for `slot` (see
    /// `tproxy_ebpf::slot`); `None`: nowhere (fail-open).
    pub fn set_cgroup_target(
        &mut self,
        slot: u32,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<()> {
        let value = addr.map(original_dst::sock_dst).unwrap_or_default();
        let mut targets: Array<&mut MapData, tproxy_ebpf::SockDst> =
            self.map_mut(names::CGROUP_TARGETS)?;
        targets.set(slot, value, 0).map_err(map_err(names::CGROUP_TARGETS))
    }

    /// Takes the cgroup hooks' record of original destinations out, for
    /// the relays.
    pub fn take_original_dsts(&mut self) -> Result<original_dst::OriginalDsts> {
        let map =
            self.ebpf.take_map(names::ORIGINAL_DST).ok_or_else(|| missing(names::ORIGINAL_DST))?;
        let map = HashMap::try_from(map).map_err(map_err(names::ORIGINAL_DST))?;
        Ok(original_dst::OriginalDsts::new(map))
    }

    /// Attaches at TC ingress of `iface`: TCX on 6.6+, a netlink clsact
    /// filter before that (aya decides). A netlink filter, and a clsact
    /// qdisc created for it, outlive the process if it is killed, so they
    /// are returned for the caller to record. The program for `kind` must
    /// have been loaded (see [`Settings::ethernet_links`]).
    pub fn attach(&mut self, iface: &str, kind: LinkKind, tcx: bool) -> Result<Attached> {
        let mut created_qdisc = false;
        if !tcx {
            // The qdisc may exist already (someone else's: it stays at the
            // end); the attach below reports real errors.
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => created_qdisc = true,
                Err(e) => debug!("clsact on {iface}: {e}"),
            }
        }
        let attach_err = |source| Error::Attach { iface: iface.to_owned(), source };
        let name = match kind {
            LinkKind::Ethernet => names::PROGRAM,
            LinkKind::L3 => names::PROGRAM_L3,
        };
        let program = program_mut(&mut self.ebpf, name)?;
        let id = program.attach(iface, TcAttachType::Ingress).map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let filter = match (link.priority(), link.handle()) {
            (Ok(priority), Ok(handle)) => {
                Some(NetlinkFilter { iface: iface.to_owned(), priority, handle: handle.into() })
            }
            _ => None,
        };
        self.links.push(link);
        Ok(Attached { filter, created_qdisc })
    }

    /// Lets packets to and from `port` of `proto` into the rule and socket
    /// lookups. Gates stay open for the program's lifetime, so that flows
    /// steered under a rule keep their sockets after the rule goes.
    pub fn open_gate(&mut self, proto: u8, port: u16) -> Result<()> {
        let Some(index) = gate_index(proto, port) else {
            return Err(Error::Config(format!("protocol {proto} cannot be intercepted")));
        };
        let mut gate: Array<&mut MapData, u8> = self.map_mut(names::PORT_GATE)?;
        gate.set(index, 1, 0).map_err(map_err(names::PORT_GATE))
    }

    /// Replaces the rules the program matches, atomically: the new entries go
    /// into the unused copy of the trie, then one write switches to it.
    pub fn replace_rules(&mut self, entries: impl Iterator<Item = TrieEntry>) -> Result<()> {
        let next = 1 - self.active_rules;
        let name = names::RULES[next as usize];
        let mut trie: LpmTrie<&mut MapData, RuleMatch, RuleAction> = self.map_mut(name)?;
        // What the copy held two changes ago.
        let stale: Vec<Key<RuleMatch>> =
            trie.keys().collect::<Result<_, MapError>>().map_err(map_err(name))?;
        for key in &stale {
            trie.remove(key).map_err(map_err(name))?;
        }
        for (prefix_len, data, action) in entries {
            trie.insert(&Key::new(prefix_len, data), action, 0).map_err(map_err(name))?;
        }
        let mut active: Array<&mut MapData, u32> = self.map_mut(names::ACTIVE_RULES)?;
        active.set(0, next, 0).map_err(map_err(names::ACTIVE_RULES))?;
        self.active_rules = next;
        Ok(())
    }

    /// Zeroes the counters of rule `id`, before the id is given to a new rule.
    pub fn reset_rule_stats(&mut self, id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| Error::io("counting CPUs", e))?;
        let zeros = PerCpuValues::try_from(vec![RuleStats::default(); cpus])
            .map_err(|e| Error::io("building per-CPU values", e))?;
        let mut stats: PerCpuArray<&mut MapData, RuleStats> = self.map_mut(names::RULE_STATS)?;
        stats.set(id, zeros, 0).map_err(map_err(names::RULE_STATS))
    }

    /// The counters of rule `id`, summed over all CPUs.
    pub fn rule_stats(&self, id: u32) -> Result<RuleStats> {
        let map = self.ebpf.map(names::RULE_STATS).ok_or_else(|| missing(names::RULE_STATS))?;
        let stats: PerCpuArray<&MapData, RuleStats> =
            PerCpuArray::try_from(map).map_err(map_err(names::RULE_STATS))?;
        let values = stats.get(&id, 0).map_err(map_err(names::RULE_STATS))?;
        Ok(values.iter().fold(RuleStats::default(), |mut sum, v| {
            sum += *v;
            sum
        }))
    }

    /// Puts one of the relay's sockets into `slot` (see `tproxy_ebpf::slot`).
    pub fn set_listener(&mut self, slot: u32, socket: &impl AsRawFd) -> Result<()> {
        let mut sockets: SockMap<&mut MapData> = self.map_mut(names::LISTENERS)?;
        sockets.set(slot, socket, 0).map_err(map_err(names::LISTENERS))
    }

    /// Reads the program's counters.
    pub fn stats(&self) -> Result<DatapathStats> {
        let map = self.ebpf.map(names::STATS).ok_or_else(|| missing(names::STATS))?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(names::STATS))?;
        let sum = |index: u32| -> Result<u64> {
            let values = counters.get(&index, 0).map_err(map_err(names::STATS))?;
            Ok(values.iter().sum())
        };
        let mut failed = None;
        let stats = DatapathStats::from_values(|index| {
            sum(index as u32).unwrap_or_else(|e| {
                failed.get_or_insert(e);
                0
            })
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// Runs the program for `kind` once on `frame` (`BPF_PROG_TEST_RUN`, in
    /// the current network namespace) and returns what its parser made of
    /// it (`PARSED_NONE` if it never parsed). Needs [`Settings::trace`].
    ///
    /// The kernel's harness takes an Ethernet frame either way and points
    /// the skb's network header past it: the L3 program then meets the
    /// layout of a tunnel that still shows its outer headers.
    pub fn trace_parse(&mut self, frame: &[u8], kind: LinkKind) -> Result<ParseTrace> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let mut traces: Array<&mut MapData, ParseTrace> = self.map_mut(names::PARSE_TRACE)?;
        traces.set(0, ParseTrace::default(), 0).map_err(map_err(names::PARSE_TRACE))?;
        let name = match kind {
            LinkKind::Ethernet => names::PROGRAM,
            LinkKind::L3 => names::PROGRAM_L3,
        };
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or_else(|| {
                Error::Load(EbpfError::ProgramError(ProgramError::UnexpectedProgramType))
            })?
            .try_into()
            .map_err(|e| Error::Load(EbpfError::ProgramError(e)))?;
        let fd = program.fd().map_err(|e| Error::Load(EbpfError::ProgramError(e)))?;
        // The `test` member of `union bpf_attr`, up to the fields we use.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
        }
        let mut attr = TestRun {
            prog_fd: fd.as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ..TestRun::default()
        };
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: the attribute and the frame outlive the call; the kernel
        // reads `size_of::<TestRun>()` bytes of the attribute.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>(),
            )
        };
        if ret != 0 {
            return Err(Error::io("BPF_PROG_TEST_RUN", std::io::Error::last_os_error()));
        }
        let map = self.ebpf.map(names::PARSE_TRACE).ok_or_else(|| missing(names::PARSE_TRACE))?;
        let traces: Array<&MapData, ParseTrace> =
            Array::try_from(map).map_err(map_err(names::PARSE_TRACE))?;
        traces.get(&0, 0).map_err(map_err(names::PARSE_TRACE))
    }

    /// Takes the maps of the host's own destinations out, for
    /// [`local_table::LocalTable`] to keep current.
    pub fn take_local_dests(&mut self) -> Result<local_table::LocalDests> {
        let map =
            self.ebpf.take_map(names::LOCAL_DESTS).ok_or_else(|| missing(names::LOCAL_DESTS))?;
        let capacity = self.local_dests_capacity;
        let trie = LpmTrie::try_from(map).map_err(map_err(names::LOCAL_DESTS))?;
        let name = names::LOCAL_DESTS_INCOMPLETE;
        let map = self.ebpf.take_map(name).ok_or_else(|| missing(name))?;
        let incomplete = Array::try_from(map).map_err(map_err(name))?;
        Ok(local_table::LocalDests { trie, incomplete, capacity })
    }

    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or_else(|| missing(name))?;
        M::try_from(map).map_err(map_err(name))
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Load(EbpfError::ProgramError(ProgramError::UnexpectedProgramType)))?;
    program.try_into().map_err(|e| Error::Load(EbpfError::ProgramError(e)))
}

fn cgroup_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    typed(ebpf, name)
}

/// The program `name`, as the type it must be.
fn typed<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Load(EbpfError::ProgramError(ProgramError::UnexpectedProgramType)))?;
    program.try_into().map_err(|e| Error::Load(EbpfError::ProgramError(e)))
}

fn reopen_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup> {
    let program = ebpf
        .program_mut(names::REOPEN_PROGRAM)
        .ok_or(Error::Load(EbpfError::ProgramError(ProgramError::UnexpectedProgramType)))?;
    program.try_into().map_err(|e| Error::Load(EbpfError::ProgramError(e)))
}

fn load_error(name: &'static str) -> impl Fn(ProgramError) -> Error {
    move |e| match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            debug!("verifier log of {name}:\n{verifier_log}");
            Error::ProgramRejected { name, source: io_error }
        }
        e => Error::Load(EbpfError::ProgramError(e)),
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn missing(name: &'static str) -> Error {
    Error::Map { name, source: aya::maps::MapError::InvalidName { name: name.to_owned() } }
}
