//! `colo-blk`: command line entry point. Parses, validates, and hands over:
//! `serve` to [`daemon`] (the stack per mode, built on the `colo-blk`
//! library), `bench` and `demo` to their modules (on the test kit's libblkio
//! client). ARCHITECTURE.md at the root of the repository maps the workspace.

mod bench;
mod config;
mod daemon;
mod demo;
mod generate;

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

/// A vhost-user-blk backend with COLO block replication.
#[derive(Parser)]
#[command(name = "colo-blk", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a raw disk image to a VMM over a vhost-user-blk socket.
    ///
    /// Without --mode this is a plain backend. The socket stays open across
    /// frontend disconnects; SIGINT/SIGTERM finish in-flight requests, flush,
    /// remove the socket and exit 0. Bad arguments exit with code 2.
    Serve(Box<config::ServeArgs>),
    /// Send one command to a running daemon's control socket (QMP).
    ///
    /// Exit status: 0 on success, 1 when the daemon answers with an error or
    /// cannot be reached, 2 for a bad command line.
    Ctl(colo_blk::control::ctl::CtlArgs),
    /// Benchmark any vhost-user-blk socket through libblkio: 4k random
    /// read/write at QD1 and QD32, 1 MiB sequential read/write at QD8.
    Bench(bench::BenchArgs),
    /// Run a whole COLO pair on this machine and check it (no arguments).
    ///
    /// Starts a primary and a secondary `serve` process linked over NBD in a
    /// temporary directory, drives a guest on each through libblkio, resyncs,
    /// takes checkpoints comparing the disks byte for byte, kills the primary,
    /// fails over, and checks the secondary disk equals its guest's view.
    Demo,
    /// Write man pages (colo-blk.1, colo-blk-serve.1, ...) into a directory.
    Man(generate::ManArgs),
    /// Print a shell completion script (bash, zsh, fish) to stdout.
    Completions(generate::CompletionArgs),
}

/// Exit code for a command line that parses but makes no sense (clap uses the
/// same code for syntax errors).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = match config::Config::try_from(*args) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match daemon::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ctl(args) => match colo_blk::control::ctl::run(&args) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match bench::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(bench::BenchError::Usage(e)) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_USAGE)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Man(args) => match generate::man_pages(&Cli::command(), &args.dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}: {e}", args.dir.display());
                ExitCode::FAILURE
            }
        },
        Command::Completions(args) => {
            match generate::completions(&mut Cli::command(), args.shell, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo => match demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo FAILED: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
