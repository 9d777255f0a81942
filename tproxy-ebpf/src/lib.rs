//! Types and constants shared by the TC program and userland.
//!
//! Everything here is `#[repr(C)]` and laid out exactly as the kernel maps
//! store it. With the `user` feature the types implement [`aya::Pod`] so that
//! userland can read and write the maps.
#![no_std]

/// IP protocol numbers, as in the IPv4 `protocol` / IPv6 `next header` field.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Address family tags used in [`RuleMatch::family`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Index of `proto`'s half of the `PORT_GATE` array, or `None` for other protocols.
#[inline(always)]
pub const fn gate_index(proto: u8, port: u16) -> Option<u32> {
    match proto {
        PROTO_TCP => Some(port as u32),
        PROTO_UDP => Some(65536 + port as u32),
        _ => None,
    }
}

/// Entries of `PORT_GATE`: one byte per (protocol, port).
pub const GATE_ENTRIES: u32 = 2 * 65536;

/// Data of a `RULES` LPM-trie key. The trie matches the first `prefix_len`
/// bits: family, protocol and port always (32 bits), then as many address bits
/// as the rule's destination prefix has. The longest matching prefix wins, so
/// `203.0.113.5/32` port 80 beats `0.0.0.0/0` port 80.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleMatch {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Destination port, network order.
    pub port: [u8; 2],
    /// Destination address, network order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
}

/// Bits of a [`RuleMatch`] before the address.
pub const RULE_MATCH_FIXED_BITS: u32 = 32;

/// One rule's say on a packet whose destination matched an entry: its
/// source filter, what it does, and its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleChoice {
    /// Index into `RULE_STATS`.
    pub rule_id: u32,
    /// `ACTION_*`.
    pub action: u32,
    /// The bits of the packet's source that must equal `src`, network
    /// order (all zero matches every source). A mask rather than a prefix
    /// length keeps the test free of branches, which the verifier would
    /// explore one by one.
    pub src_mask: [u32; 4],
    /// Source network, network order, masked; IPv4 uses `src[0]`.
    pub src: [u32; 4],
}

/// Most rules that can have a say on one (protocol, port, destination).
pub const RULE_CHOICES: usize = 4;

/// Value of the `RULES` trie: the rules whose destination covers the
/// entry's, most specific destination first, then most specific source. The
/// first whose source filter matches the packet decides; when none does,
/// the packet is not intercepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleAction {
    /// How many of `choices` are in use.
    pub len: u32,
    /// In order of precedence.
    pub choices: [RuleChoice; RULE_CHOICES],
}

/// Steer the packet to the relay.
pub const ACTION_INTERCEPT: u32 = 1;
/// Leave the packet alone (an exclusion that beats a shorter prefix).
pub const ACTION_EXCLUDE: u32 = 2;

/// Key data of the `LOCAL_DESTS` trie: the destinations this host receives
/// itself (every route of its `local` table: its addresses, broadcast,
/// anycast and multicast). The trie matches `ADDR_KEY_FIXED_BITS` plus the
/// prefix's bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
}

/// Bits of an [`AddrKey`] before the address.
pub const ADDR_KEY_FIXED_BITS: u32 = 32;

/// Size of the `LOCAL_DESTS` trie.
pub const MAX_LOCAL_DESTS: u32 = 16384;

/// Size of the `RULES` trie (entries are allocated on insert).
pub const MAX_RULE_ENTRIES: u32 = 1 << 18;
/// Rules (and per-rule counter slots).
pub const MAX_RULES: u32 = 1024;

/// Per-rule counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Packets this rule steered: those that needed a rule (the first of
    /// each flow, and SYN-cookie ACKs). Later packets of a flow go to its
    /// socket without a rule lookup, counted by the datapath's `to_socket`.
    pub packets: u64,
    /// Bytes of those packets, IP header included.
    pub bytes: u64,
    /// New flows handed to the relay: TCP SYNs and UDP datagrams to the listener.
    pub new_flows: u64,
    /// Matched packets passed untouched because the relay's socket was gone.
    pub no_listener: u64,
    /// Matched packets `bpf_sk_assign` refused; they passed untouched.
    pub assign_failed: u64,
}

impl core::ops::AddAssign for RuleStats {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.no_listener += other.no_listener;
        self.assign_failed += other.assign_failed;
    }
}

/// Key of the `TW_REOPEN` map: a TCP tuple whose SYN met a TIME_WAIT socket
/// on its way in. Addresses in network order (IPv4 in `[0]`), ports in host
/// order.
///
/// The TC program hands such a SYN to the TIME_WAIT socket; the kernel then
/// looks for a listener on the original port, the `sk_lookup` program finds
/// the tuple here and answers with the relay's listener, and the kernel
/// retires the TIME_WAIT socket, as iptables TPROXY does in
/// `nf_tproxy_handle_time_wait4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReopenKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub ipv6: u8,
    pub _pad: [u8; 3],
}

/// Size of the `TW_REOPEN` LRU map; entries live for microseconds.
pub const MAX_REOPENS: u32 = 16384;

/// Slots of the `LISTENERS` sockmap, which holds the relay's own sockets.
/// The program assigns new flows to these; when the relay dies the kernel
/// removes its sockets from the map and traffic passes untouched.
pub mod slot {
    pub const TCP_V4: u32 = 0;
    pub const TCP_V6: u32 = 1;
    pub const UDP_V4: u32 = 2;
    pub const UDP_V6: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Indexes of the per-CPU `STATS` counters (all rules together): each is
/// one outcome of a packet, counted once. Userland describes them in the
/// same order (`DatapathStats`).
pub mod stat {
    /// Packets assigned to the listener, the relay's or `--to-port`'s (new
    /// TCP flows, UDP datagrams).
    pub const TO_LISTENER: u32 = 0;
    /// Packets assigned to a socket that already owns their tuple.
    pub const TO_SOCKET: u32 = 1;
    /// Matched packets passed untouched because no listener was there (fail-open).
    pub const NO_LISTENER: u32 = 2;
    /// `bpf_sk_assign` refused the socket; the packet passed untouched.
    pub const ASSIGN_FAILED: u32 = 3;
    /// SYNs of intercepted flows that met a TIME_WAIT socket holding their
    /// tuple, handed to it (to be handed over to the listener).
    pub const TW_SYN: u32 = 4;
    /// Of those, the ones the `sk_lookup` program handed to the listener.
    pub const TW_HANDOVER: u32 = 5;
    /// Replies to the relay's spoofed upstream sockets, steered back to them.
    pub const RETURN_PATH: u32 = 6;
    /// Packets on gated ports to one of this host's own destinations, left
    /// to the host.
    pub const TO_HOST: u32 = 7;
    /// ICMP errors about packets of the relay's sockets, delivered to them.
    pub const ICMP_TO_SOCKET: u32 = 8;
    /// Packets that may be for an intercepted port but cannot be parsed
    /// whole (first fragments, IPv6 chains past the walk), passed.
    pub const UNPARSED_PASSED: u32 = 9;
    /// The same, dropped (`--unparsed drop`).
    pub const UNPARSED_DROPPED: u32 = 10;
    /// Connections and unconnected datagrams of the host's own processes
    /// (`--cgroup`) sent to the relay instead of their destination.
    pub const CGROUP_TO_TARGET: u32 = 11;
    /// The same that a rule intercepts, let through to their destination
    /// because no target was there (fail-open).
    pub const CGROUP_NO_TARGET: u32 = 12;
    /// Packets and connections passed because the host's own destinations
    /// were incomplete (`LOCAL_DESTS_INCOMPLETE`) and nothing could say
    /// their destination is not one: the TC program asks the FIB, which
    /// cannot answer on an interface that does not forward; the cgroup
    /// hooks cannot ask.
    pub const LOCAL_UNKNOWN: u32 = 13;
    /// New flows dropped because the `--to-port` listener on the port was
    /// not the owner's (any user can bind the port while it is down).
    pub const TARGET_FOREIGN: u32 = 14;
    pub const COUNT: u32 = 15;
}

/// A socket address as the cgroup hooks see it (`struct bpf_sock_addr`):
/// where a socket of the host's own asked to go, or where it is sent
/// instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockDst {
    /// Network order; IPv4 in `[0]`. An IPv6 socket's IPv4-mapped address
    /// stays mapped.
    pub addr: [u32; 4],
    /// The port in network order, in the low 16 bits (as `user_port`).
    pub port: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: the socket's family.
    pub family: u32,
}

/// Key of the `PEER_DST` map: the local address and port of a rewritten
/// TCP socket, which is what the socket accepted on the other end sees as
/// its peer. Addresses in network order (IPv4 in `[0]`), the port in host
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: [u32; 4],
    pub port: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: the connection's (an IPv4-mapped
    /// connection is IPv4).
    pub family: u32,
}

/// Size of the `ORIGINAL_DST` LRU map: sockets of the host's own whose
/// destination was rewritten, by socket cookie.
pub const MAX_ORIGINAL_DSTS: u32 = 65536;

/// What the parser made of the last packet, when the loader enables
/// tracing (tests: `BPF_PROG_TEST_RUN` against a userland oracle). With
/// tracing off the verifier removes the recording: it costs nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseTrace {
    /// `PARSED_*`.
    pub kind: u32,
    pub proto: u8,
    pub ipv6: u8,
    pub syn: u8,
    pub _pad: u8,
    /// Host order.
    pub sport: u16,
    /// Host order.
    pub dport: u16,
    /// The tuple the program looks sockets up with, network order (IPv4 in
    /// `[0]`).
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// [`ParseTrace::kind`]: nothing to steer.
pub const PARSED_NONE: u32 = 0;
/// A TCP segment or UDP datagram.
pub const PARSED_FLOW: u32 = 1;
/// An ICMP error; the tuple is the quoted packet's, reversed.
pub const PARSED_ERROR: u32 = 2;
/// A first fragment.
pub const PARSED_FRAGMENT: u32 = 3;
/// An IPv6 extension chain longer than the walk.
pub const PARSED_TOO_DEEP: u32 = 4;

/// Names of the maps, programs and globals in the object file.
pub mod names {
    pub const PROGRAM: &str = "tproxy_ingress";
    /// The same program for L3 devices, whose packets start at the IP header.
    pub const PROGRAM_L3: &str = "tproxy_ingress_l3";
    pub const REOPEN_PROGRAM: &str = "tproxy_reopen";
    pub const TW_REOPEN: &str = "TW_REOPEN";
    pub const PORT_GATE: &str = "PORT_GATE";
    /// The two copies of the rule trie, and which one is in use.
    pub const RULES: [&str; 2] = ["RULES_0", "RULES_1"];
    pub const ACTIVE_RULES: &str = "ACTIVE_RULES";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const STATS: &str = "STATS";
    /// Mark put on steered packets; policy routing delivers them locally.
    pub const MARK: &str = "MARK";
    /// Packets already carrying this mark are the relay's own and never steered.
    pub const BYPASS_MARK: &str = "BYPASS_MARK";
    /// Non-zero: also steer replies to the relay's spoofed upstream sockets.
    pub const RETURN_PATH: &str = "RETURN_PATH";
    /// The host's own destinations, which are never steered...
    pub const LOCAL_DESTS: &str = "LOCAL_DESTS";
    /// ...unless this is non-zero.
    pub const INTERCEPT_LOCAL: &str = "INTERCEPT_LOCAL";
    /// Non-zero while `LOCAL_DESTS` may lack some of them.
    pub const LOCAL_DESTS_INCOMPLETE: &str = "LOCAL_DESTS_INCOMPLETE";
    /// Non-zero: drop what may be for an intercepted port but cannot be
    /// parsed whole, instead of passing it.
    pub const DROP_UNPARSED: &str = "DROP_UNPARSED";
    /// Non-zero: new flows go to whatever transparent listener has this
    /// port (`--to-port`), not to the relay's sockets in `LISTENERS`.
    pub const TARGET_PORT: &str = "TARGET_PORT";
    /// The uid that must own that listener; `u32::MAX`: any.
    pub const TARGET_OWNER: &str = "TARGET_OWNER";
    /// The address that listener is bound to, when not the wildcard
    /// (network order; 0 and `::` mean the packet's own destination).
    pub const TARGET_ADDR4: &str = "TARGET_ADDR4";
    pub const TARGET_ADDR6: &str = "TARGET_ADDR6";
    /// The cgroup hooks (`--cgroup`), attached to each given cgroup.
    pub const CGROUP_PROGRAMS: [&str; 8] = [
        "tproxy_connect4",
        "tproxy_connect6",
        "tproxy_sendmsg4",
        "tproxy_sendmsg6",
        "tproxy_recvmsg4",
        "tproxy_recvmsg6",
        "tproxy_getpeername4",
        "tproxy_getpeername6",
    ];
    /// Records the rewritten TCP sockets by their local address, once
    /// connecting gave them one, for `GETSOCKOPT_PROGRAM`.
    pub const SOCKOPS_PROGRAM: &str = "tproxy_sockops";
    /// Answers `getsockopt(SO_ORIGINAL_DST)` on the accepting end of such
    /// a socket, as iptables REDIRECT's conntrack does.
    pub const GETSOCKOPT_PROGRAM: &str = "tproxy_original_dst";
    /// Where the cgroup hooks send what a rule intercepts, by `slot`: the
    /// relay's loopback sockets, or `--to-port`'s.
    pub const CGROUP_TARGETS: &str = "CGROUP_TARGETS";
    /// The destination each rewritten socket asked for, by socket cookie.
    pub const ORIGINAL_DST: &str = "ORIGINAL_DST";
    /// The network namespace (its cookie) whose sockets the cgroup hooks
    /// rewrite; 0: any (kernels before 5.14 cannot tell userland theirs).
    pub const NETNS_COOKIE: &str = "NETNS_COOKIE";
    /// Non-zero: record each parse in `PARSE_TRACE` (tests only).
    pub const TRACE_PARSE: &str = "TRACE_PARSE";
    pub const PARSE_TRACE: &str = "PARSE_TRACE";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding.
    unsafe impl aya::Pod for super::RuleMatch {}
    unsafe impl aya::Pod for super::RuleAction {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::ParseTrace {}
    unsafe impl aya::Pod for super::RuleStats {}
    unsafe impl aya::Pod for super::ReopenKey {}
    unsafe impl aya::Pod for super::SockDst {}
    unsafe impl aya::Pod for super::PeerKey {}
}
