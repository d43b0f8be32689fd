//! What the server process costs while it is measured: CPU time
//! (`utime + stime` from `/proc/PID/stat`) and its thread count
//! (`/proc/PID/task`). Linux only; the server must run on this machine.

use super::BenchError;
use std::path::PathBuf;

/// Reads one process's CPU time and thread count.
#[derive(Debug, Clone)]
pub struct Probe {
    proc_dir: PathBuf,
    ticks_per_second: f64,
}

impl Probe {
    /// A probe of process `pid`; fails when `/proc/PID/stat` cannot be read.
    pub fn new(pid: u32) -> Result<Self, BenchError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let probe = Probe {
            proc_dir: PathBuf::from(format!("/proc/{pid}")),
            ticks_per_second: if hz > 0 { hz as f64 } else { 100.0 },
        };
        probe
            .cpu_seconds()
            .ok_or_else(|| BenchError::Usage(format!("cannot read /proc/{pid}/stat")))?;
        Ok(probe)
    }

    /// User plus system CPU seconds the process has used so far (all threads).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(self.proc_dir.join("stat")).ok()?;
        parse_cpu_ticks(&stat).map(|t| t as f64 / self.ticks_per_second)
    }

    /// Threads the process has now.
    pub fn threads(&self) -> Option<usize> {
        std::fs::read_dir(self.proc_dir.join("task"))
            .ok()
            .map(|dir| dir.filter(|e| e.is_ok()).count())
    }
}

/// `utime + stime` (fields 14 and 15, in clock ticks) of a `/proc/PID/stat`
/// line. The command name (field 2) is in parentheses and may contain spaces
/// or parentheses itself, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with field 3 (state): utime is the 12th field of rest.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        let line = "4242 (colo-blk) S 1 4242 4242 0 -1 4194560 1200 0 3 0 \
                    250 75 0 0 20 0 5 0 123456 10000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(line), Some(325));
    }

    #[test]
    fn command_names_with_spaces_and_parentheses_are_skipped() {
        let line = "7 (qemu (x) d) R 1 7 7 0 -1 0 0 0 0 0 9 1 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_cpu_ticks(line), Some(10));
    }

    #[test]
    fn truncated_lines_give_nothing() {
        assert_eq!(parse_cpu_ticks("7 (x) R 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let probe = Probe::new(std::process::id()).unwrap();
        assert!(probe.cpu_seconds().is_some());
        assert!(probe.threads().unwrap_or(0) >= 1);
    }
}
