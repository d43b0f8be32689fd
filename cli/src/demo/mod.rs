//! `colo-blk demo`: a whole COLO pair on this machine, in temporary files.
//!
//! Two real `colo-blk serve` processes (primary and secondary) linked over NBD,
//! a libblkio guest on each, the initial resync, checkpoints with the disks
//! compared byte for byte, a primary host failure, failover on the secondary,
//! and the final check that the secondary disk equals what its guest saw.

use colo_blk::block::BlockDevExt;
use colo_blk::control::client::QmpClient;
use colo_blk_testkit::{pattern, Client, ClientOptions, Process, Queue, XorShift};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DISK: u64 = 64 << 20;
const CHECKPOINTS: usize = 3;
const STEPS: usize = 9;

/// Runs the demo, printing a line per step; the error says which check failed.
pub fn run() -> Result<(), String> {
    let dir = tempfile_dir()?;
    let result = Demo::new(&dir).and_then(|mut d| d.run());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir().join(format!("colo-blk-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    Ok(base)
}

struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_string_lossy().into_owned()
    }
}

struct Demo {
    paths: Paths,
    rng: XorShift,
    step: usize,
}

impl Demo {
    fn new(dir: &Path) -> Result<Self, String> {
        Ok(Demo {
            paths: Paths {
                dir: dir.to_owned(),
            },
            rng: XorShift::new(0x00c0_10b1_c0de),
            step: 0,
        })
    }

    fn say(&mut self, text: String) {
        self.step += 1;
        println!("[{}/{STEPS}] {text}", self.step);
    }

    fn run(&mut self) -> Result<(), String> {
        let p = &self.paths;
        println!(
            "colo-blk demo: a COLO pair on this machine ({} MiB disk, work dir {})",
            DISK >> 20,
            p.dir.display()
        );
        // The primary disk starts with data in its first quarter and holes after.
        let primary_img = p.p("primary.img");
        let seed = pattern(1, (DISK / 4) as usize);
        std::fs::write(&primary_img, &seed).map_err(|e| e.to_string())?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&primary_img)
            .map_err(|e| e.to_string())?;
        f.set_len(DISK).map_err(|e| e.to_string())?;

        let (sec_sock, sec_ctl, nbd_sock) = (p.p("sec.sock"), p.p("sec.ctl"), p.p("nbd.sock"));
        let mut secondary = serve(
            "secondary",
            &[
                "--mode".into(),
                "secondary".into(),
                "--disk".into(),
                p.s("secondary.img"),
                "--size".into(),
                DISK.to_string(),
                "--socket".into(),
                p.s("sec.sock"),
                "--control".into(),
                p.s("sec.ctl"),
                "--nbd-listen".into(),
                format!("unix:{}", p.s("nbd.sock")),
            ],
            &[&sec_sock, &sec_ctl, &nbd_sock],
            p.p("secondary.log"),
        )?;
        let (pri_sock, pri_ctl) = (p.p("pri.sock"), p.p("pri.ctl"));
        let mut primary = serve(
            "primary",
            &[
                "--mode".into(),
                "primary".into(),
                "--disk".into(),
                p.s("primary.img"),
                "--socket".into(),
                p.s("pri.sock"),
                "--control".into(),
                p.s("pri.ctl"),
                "--secondary".into(),
                format!("nbd+unix:///parent0?socket={}", p.s("nbd.sock")),
            ],
            &[&pri_sock, &pri_ctl],
            p.p("primary.log"),
        )?;
        let logs = |primary: &Process, secondary: &Process, e: String| {
            format!("{e}\n{}\n{}", primary.log_tail(), secondary.log_tail())
        };
        let out = self.scenario(&mut primary, &pri_sock, &pri_ctl, &sec_sock, &sec_ctl);
        out.map_err(|e| logs(&primary, &secondary, e))?;
        secondary.kill();
        Ok(())
    }

    fn scenario(
        &mut self,
        primary: &mut Process,
        pri_sock: &Path,
        pri_ctl: &Path,
        sec_sock: &Path,
        sec_ctl: &Path,
    ) -> Result<(), String> {
        let opts = ClientOptions::default();
        let mut pguest =
            Client::connect_with(pri_sock, opts).map_err(|e| format!("primary guest: {e}"))?;
        let mut sguest =
            Client::connect_with(sec_sock, opts).map_err(|e| format!("secondary guest: {e}"))?;
        let mut pqmp = qmp(pri_ctl)?;
        let mut sqmp = qmp(sec_ctl)?;
        self.say(
            "started the secondary (NBD on a unix socket) and the primary; both guests connected"
                .into(),
        );

        exec(&mut sqmp, "replication-start", json!({"mode": "secondary"}))?;
        let t = Instant::now();
        exec(
            &mut pqmp,
            "replication-start",
            json!({"mode": "primary", "sync": "full"}),
        )?;
        let st = wait_for(&mut pqmp, "resync to finish", |s| {
            s["resync"]["total"]
                .as_u64()
                .is_some_and(|t| s["resync"]["done"].as_u64() == Some(t))
        })?;
        self.say(format!(
            "replication started; full resync of {} MiB (data and holes) in {:.2} s",
            st["resync"]["total"].as_u64().unwrap_or(0) >> 20,
            t.elapsed().as_secs_f64()
        ));

        for round in 1..=CHECKPOINTS {
            let pw = self.random_writes(pguest.queue(0), 200)?;
            // The secondary VM diverges between checkpoints; its writes live in
            // the active disk and are dropped at the next checkpoint.
            let sw = self.random_writes(sguest.queue(0), 50)?;
            exec(&mut pqmp, "replication-checkpoint", json!({}))?;
            exec(&mut sqmp, "replication-checkpoint", json!({}))?;
            compare_files(&self.paths.p("primary.img"), &self.paths.p("secondary.img"))?;
            let view = read_all(sguest.queue(0))?;
            compare_bytes(
                "secondary guest view",
                &view,
                &std::fs::read(self.paths.p("primary.img")).map_err(|e| e.to_string())?,
            )?;
            self.say(format!(
                "checkpoint {round}: primary guest wrote {pw} KiB, secondary guest {sw} KiB; \
                 secondary disk and secondary guest view equal the primary disk ({} MiB compared)",
                DISK >> 20
            ));
        }

        let pw = self.random_writes(pguest.queue(0), 150)?;
        let sw = self.random_writes(sguest.queue(0), 80)?;
        let expected = read_all(sguest.queue(0))?;
        drop(pguest);
        primary.kill();
        self.say(format!(
            "primary host lost (SIGKILL) after {pw} KiB of uncheckpointed primary writes; \
             secondary guest wrote {sw} KiB since the last checkpoint"
        ));

        let t = Instant::now();
        exec(&mut sqmp, "replication-stop", json!({"failover": true}))?;
        let st = wait_for(&mut sqmp, "failover to complete", |s| {
            s["stage"] == "done" || s["stage"] == "failover-failed"
        })?;
        if st["stage"] != "done" {
            return Err(format!("failover failed: {st}"));
        }
        self.say(format!(
            "failover: overlays committed into the secondary disk in {:.2} s (guest kept running)",
            t.elapsed().as_secs_f64()
        ));

        compare_bytes(
            "secondary disk after failover",
            &std::fs::read(self.paths.p("secondary.img")).map_err(|e| e.to_string())?,
            &expected,
        )?;
        let after = read_all(sguest.queue(0))?;
        compare_bytes("secondary guest view after failover", &after, &expected)?;
        self.say(
            "secondary disk equals the secondary guest's view byte for byte; \
                  the primary's uncheckpointed writes were rolled back"
                .into(),
        );

        // Fencing: the old primary's link is refused now.
        let uri = format!("nbd+unix:///parent0?socket={}", self.paths.s("nbd.sock"));
        let fenced = match colo_blk::nbd::Client::connect(&uri) {
            Ok(c) => c.write_at(0, &[0xaa; 4096]).is_err(),
            Err(_) => true,
        };
        if !fenced {
            return Err("a write from the old primary's side was accepted after failover".into());
        }
        let probe = self.random_writes(sguest.queue(0), 20)?;
        exec(&mut sqmp, "replication-checkpoint", json!({}))?;
        let st = exec(&mut sqmp, "query-replication", json!({}))?;
        self.say(format!(
            "promoted secondary serves alone: old primary's NBD writes refused (fenced); \
             guest wrote {probe} KiB more; checkpoint is a no-op; stage {}",
            st["stage"]
        ));
        println!("demo passed: {CHECKPOINTS} checkpoints verified, failover verified");
        Ok(())
    }

    /// Writes `count` random 4 KiB-aligned blocks (4..64 KiB); returns KiB written.
    fn random_writes(&mut self, q: &mut Queue, count: usize) -> Result<u64, String> {
        let mut kib = 0;
        for _ in 0..count {
            let len = ((self.rng.next() % 16 + 1) * 4096) as usize;
            let off = self.rng.next() % ((DISK - len as u64) / 4096) * 4096;
            let data = pattern(self.rng.next(), len);
            q.write(off, &data)
                .map_err(|e| format!("guest write at {off}: {e}"))?;
            kib += len as u64 / 1024;
        }
        Ok(kib)
    }
}

/// Starts `colo-blk serve ARGS` (this same executable), logging to `log`, and
/// waits until every path in `sockets` is a socket.
fn serve(name: &str, args: &[String], sockets: &[&Path], log: PathBuf) -> Result<Process, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").args(args);
    let mut p = Process::spawn(name, cmd, Some(&log)).map_err(|e| e.to_string())?;
    p.wait_for_sockets(sockets)
        .map_err(|e| format!("{e}:\n{}", p.log_tail()))?;
    Ok(p)
}

fn qmp(path: &Path) -> Result<QmpClient, String> {
    QmpClient::connect(path, Some(Duration::from_secs(120)))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn exec(q: &mut QmpClient, cmd: &str, args: Value) -> Result<Value, String> {
    q.execute(cmd, args).map_err(|e| format!("{cmd}: {e}"))
}

fn wait_for(q: &mut QmpClient, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = exec(q, "query-replication", json!({}))?;
        if done(&st) {
            return Ok(st);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}: {st}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_all(q: &mut Queue) -> Result<Vec<u8>, String> {
    const CHUNK: usize = 1 << 20;
    let mut out = Vec::with_capacity(DISK as usize);
    for off in (0..DISK).step_by(CHUNK) {
        out.extend(
            q.read(off, CHUNK)
                .map_err(|e| format!("guest read at {off}: {e}"))?,
        );
    }
    Ok(out)
}

fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let x = std::fs::read(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let y = std::fs::read(b).map_err(|e| format!("{}: {e}", b.display()))?;
    compare_bytes(&format!("{} vs {}", a.display(), b.display()), &x, &y)
}

fn compare_bytes(what: &str, x: &[u8], y: &[u8]) -> Result<(), String> {
    if x.len() != y.len() {
        return Err(format!(
            "{what}: lengths differ ({} vs {})",
            x.len(),
            y.len()
        ));
    }
    match x.iter().zip(y).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: first difference at byte {i}: {} vs {}",
            x[i], y[i]
        )),
    }
}
