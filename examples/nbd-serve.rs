//! Test and benchmark helper: serves a raw image over NBD with colo-blk's
//! server until SIGTERM or SIGINT.
//!
//! `nbd-serve --image PATH --listen unix:PATH|tcp:HOST:PORT [--export NAME]
//!            [--size BYTES] [--workers N] [--read-only]`
//!
//! Prints `ready` on stdout once listening. The real entry point is
//! `colo-blk serve --mode secondary --nbd-listen ...`; this exists so the NBD
//! layer can be measured on a plain raw file.

use colo_blk::block::{RawFile, RawFileOptions};
use colo_blk::nbd::{NbdAddr, Server, ServerOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run() {
        eprintln!("nbd-serve: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut image = None;
    let mut listen = None;
    let mut opts = ServerOptions::default();
    let mut raw = RawFileOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--image" => image = Some(PathBuf::from(val()?)),
            "--listen" => listen = Some(NbdAddr::parse_listen(&val()?)?),
            "--export" => opts.export_name = val()?,
            "--size" => raw.create_size = Some(val()?.parse()?),
            "--workers" => opts.workers_per_connection = val()?.parse()?,
            "--read-only" => raw.read_only = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let image = image.ok_or("--image is required")?;
    let listen = listen.ok_or("--listen is required")?;
    let signals = block_termination_signals();
    let dev = Arc::new(RawFile::open(&image, &raw)?);
    let server = Server::start(&listen, dev, opts)?;
    println!("ready {}", server.local_addr());
    std::io::stdout().flush()?;
    wait_for(&signals);
    server.shutdown();
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread started
/// after it), so they can be waited for synchronously.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: set was initialised by block_termination_signals; sig is a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
}
