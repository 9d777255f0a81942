//! A TCP echo server for the load test, in its own process so that the test
//! process does not hold both ends of every connection (file limits).
//!
//! `echo-server ADDR`: each connection is read to EOF, echoed back whole,
//! and closed. Prints `ready` once listening.

use std::{
    io::{Read, Write},
    net::TcpListener,
    thread,
};

fn main() {
    let addr = std::env::args().nth(1).expect("usage: echo-server ADDR");
    raise_fd_limit();
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    println!("ready");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Small stacks: there are thousands of these at once.
        let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            let mut data = Vec::new();
            if stream.read_to_end(&mut data).is_ok() {
                let _ = stream.write_all(&data);
            }
        });
    }
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
