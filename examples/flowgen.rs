//! Benchmark helper: sends one UDP packet to each of `count` distinct destinations
//! (`base` + i over a /16, destination port varied every 65,536), so that every packet is a
//! new conntrack flow going through the NAT hook. Prints the elapsed seconds.
//!
//! usage: flowgen BASE_IPV4 COUNT

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: flowgen BASE_IPV4 COUNT");
        std::process::exit(2);
    }
    let base: Ipv4Addr = match args[1].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgen: bad address {:?}: {e}", args[1]);
            std::process::exit(2);
        }
    };
    let count: u32 = match args[2].parse() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("flowgen: bad count {:?}: {e}", args[2]);
            std::process::exit(2);
        }
    };
    let sock = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flowgen: bind: {e}");
            std::process::exit(1);
        }
    };
    let base = u32::from(base);
    let payload = [0u8; 16];
    let t = Instant::now();
    let mut errors = 0u64;
    for i in 0..count {
        let addr = Ipv4Addr::from(base.wrapping_add(i & 0xffff));
        let port = 10_000 + (i >> 16) as u16;
        if sock
            .send_to(&payload, SocketAddrV4::new(addr, port))
            .is_err()
        {
            errors += 1;
        }
    }
    println!("{:.6} {errors}", t.elapsed().as_secs_f64());
}
