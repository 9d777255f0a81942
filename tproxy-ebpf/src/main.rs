//! The programs: a TC ingress classifier that steers packets for
//! intercepted ports to the relay (`program`), and cgroup hooks that send
//! the host's own connections there (`cgroup`), over shared rules and
//! counters.
//!
//! The classifier never drops and never rewrites a packet. A steered packet
//! gets a socket (`bpf_sk_assign`) and a mark; everything else passes as it
//! came.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod cgroup;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod program;
#[cfg(target_arch = "bpf")]
mod rules;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod socket;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod steer;

// The bin is only meaningful for the BPF target; on the host it is an empty
// stub so that `cargo check --workspace` and clippy work.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
