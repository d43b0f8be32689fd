//! Two hosts on one machine: a pair of network namespaces joined by a veth
//! link, created by the test and removed when it ends (panics included), with
//! nftables to cut the link (packets dropped, as a partition does: no reset,
//! no unreachable, so connects and requests hang rather than fail).
//!
//! Daemons run inside a namespace through `ip netns exec`, which execs the
//! program in place: the pid we hold is the daemon's. Unix sockets (vhost,
//! control) live in the file system, so the test reaches them from outside.
//!
//! Needs root (ip netns, nft). Use with `mod netns;` beside `mod common;`.
#![allow(dead_code)]

use super::common::{Daemon, BIN};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

/// Two namespaces `a` (the primary's host) and `b` (the secondary's) on a
/// veth link, `ip_a` / `ip_b` on a /24 of their own.
pub struct TwoHosts {
    /// Namespace of host A.
    pub a: String,
    /// Namespace of host B.
    pub b: String,
    /// Host A's address.
    pub ip_a: String,
    /// Host B's address.
    pub ip_b: String,
}

impl TwoHosts {
    /// Creates both namespaces and the link. Each call in a process gets its
    /// own names and subnet, so tests in one binary run in parallel.
    pub fn new() -> TwoHosts {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let hosts = TwoHosts {
            a: format!("cbA{tag}"),
            b: format!("cbB{tag}"),
            // Spread over 10.210-10.249.x.0/24 by pid and counter.
            ip_a: format!("10.{}.{}.1", 210 + (std::process::id() % 40), n % 250),
            ip_b: format!("10.{}.{}.2", 210 + (std::process::id() % 40), n % 250),
        };
        // From here on, Drop removes whatever was created.
        must(&["ip", "netns", "add", &hosts.a]);
        must(&["ip", "netns", "add", &hosts.b]);
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        must(&[
            "ip", "link", "add", &va, "netns", &hosts.a, "type", "veth", "peer", "name", &vb,
            "netns", &hosts.b,
        ]);
        for (ns, dev, ip) in [(&hosts.a, &va, &hosts.ip_a), (&hosts.b, &vb, &hosts.ip_b)] {
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        hosts
    }

    /// Drops every packet host B receives from the link (a partition, as
    /// seen from A: SYNs and requests vanish).
    pub fn partition(&self) {
        let table = "table inet colo_partition { chain in { type filter hook input priority 0; policy accept; iifname != \"lo\" drop; }; }";
        must(&["ip", "netns", "exec", &self.b, "nft", table]);
    }

    /// Undoes [`TwoHosts::partition`].
    pub fn heal(&self) {
        must(&[
            "ip",
            "netns",
            "exec",
            &self.b,
            "nft",
            "delete",
            "table",
            "inet",
            "colo_partition",
        ]);
    }

    /// Starts `colo-blk ARGS...` inside namespace `ns`; waits for `socket`.
    /// `ip netns exec` execs colo-blk in place: the pid held is the daemon's.
    pub fn spawn<S: AsRef<OsStr>>(ns: &str, args: &[S], socket: &Path, log: &Path) -> Daemon {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN]).args(args);
        Daemon::start(cmd, socket, log)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = run(&["ip", "netns", "del", &self.a]);
        let _ = run(&["ip", "netns", "del", &self.b]);
    }
}

/// A primary in host A and a secondary in host B linked over TCP, each with
/// a vhost socket and a control socket in `dir`.
pub struct Pair {
    /// The secondary (host B). Declared first: dropped after the primary.
    pub secondary: Daemon,
    /// The primary (host A).
    pub primary: Daemon,
    /// Primary's vhost-user socket.
    pub primary_vhost: PathBuf,
    /// Primary's control socket.
    pub primary_ctl: PathBuf,
    /// Secondary's control socket.
    pub secondary_ctl: PathBuf,
    /// Primary image.
    pub primary_img: PathBuf,
    /// Secondary image.
    pub secondary_img: PathBuf,
}

impl Pair {
    /// Starts both daemons on fresh sparse images of `size` bytes; the
    /// primary gets `primary_extra` flags too. Replication is not started.
    pub fn start(hosts: &TwoHosts, dir: &Path, size: u64, primary_extra: &[&str]) -> Pair {
        let primary_img = dir.join("primary.img");
        let secondary_img = dir.join("secondary.img");
        super::common::sparse_image(&primary_img, size);
        super::common::sparse_image(&secondary_img, size);
        let sec_vhost = dir.join("sec-vhost.sock");
        let secondary_ctl = dir.join("sec-ctl.sock");
        let listen = format!("tcp:{}:10809", hosts.ip_b);
        let sec_args: Vec<&OsStr> = vec![
            "serve".as_ref(),
            "--mode".as_ref(),
            "secondary".as_ref(),
            "--socket".as_ref(),
            sec_vhost.as_os_str(),
            "--disk".as_ref(),
            secondary_img.as_os_str(),
            "--control".as_ref(),
            secondary_ctl.as_os_str(),
            "--nbd-listen".as_ref(),
            listen.as_ref(),
            // A veth address in a namespace the test made: plain text on purpose.
            "--nbd-insecure".as_ref(),
        ];
        let secondary = TwoHosts::spawn(&hosts.b, &sec_args, &sec_vhost, &dir.join("sec.log"));
        let primary_vhost = dir.join("pri-vhost.sock");
        let primary_ctl = dir.join("pri-ctl.sock");
        let primary = Self::spawn_primary(hosts, dir, &primary_img, primary_extra);
        Pair {
            secondary,
            primary,
            primary_vhost,
            primary_ctl,
            secondary_ctl,
            primary_img,
            secondary_img,
        }
    }

    /// Starts the primary again (after it was killed) on the same image.
    pub fn restart_primary(&mut self, hosts: &TwoHosts, dir: &Path, primary_extra: &[&str]) {
        // A killed daemon leaves its socket files; waiting on them would
        // return before the new process listens.
        let _ = std::fs::remove_file(&self.primary_vhost);
        let _ = std::fs::remove_file(&self.primary_ctl);
        self.primary = Self::spawn_primary(hosts, dir, &self.primary_img, primary_extra);
    }

    fn spawn_primary(
        hosts: &TwoHosts,
        dir: &Path,
        primary_img: &Path,
        primary_extra: &[&str],
    ) -> Daemon {
        let primary_vhost = dir.join("pri-vhost.sock");
        let primary_ctl = dir.join("pri-ctl.sock");
        let uri = format!("nbd://{}:10809/parent0", hosts.ip_b);
        let mut pri_args: Vec<&OsStr> = vec![
            "serve".as_ref(),
            "--mode".as_ref(),
            "primary".as_ref(),
            "--socket".as_ref(),
            primary_vhost.as_os_str(),
            "--disk".as_ref(),
            primary_img.as_os_str(),
            "--control".as_ref(),
            primary_ctl.as_os_str(),
            "--secondary".as_ref(),
            uri.as_ref(),
        ];
        pri_args.extend(primary_extra.iter().map(OsStr::new));
        TwoHosts::spawn(&hosts.a, &pri_args, &primary_vhost, &dir.join("pri.log"))
    }
}
