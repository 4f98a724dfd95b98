//! CPU time as the kernel accounts it, split into the program's own code
//! (user) and the kernel's work for it (system: for a server on loopback,
//! mostly TCP). The serving benchmark reads it around a maximum-throughput
//! run to say how much of each request the kernel alone costs, next to the
//! time per request a throughput goal leaves.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// CPU time used, user and kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    pub user: Duration,
    pub kernel: Duration,
}

impl std::ops::Add for CpuTime {
    type Output = CpuTime;

    fn add(self, other: CpuTime) -> CpuTime {
        CpuTime { user: self.user + other.user, kernel: self.kernel + other.kernel }
    }
}

impl std::ops::Sub for CpuTime {
    type Output = CpuTime;

    /// What was used between two readings (`later - earlier`).
    fn sub(self, earlier: CpuTime) -> CpuTime {
        CpuTime { user: self.user.saturating_sub(earlier.user), kernel: self.kernel.saturating_sub(earlier.kernel) }
    }
}

impl CpuTime {
    /// Per request, in microseconds, `(user, kernel)`, for `requests`
    /// answered while this was used.
    pub fn per_request_us(&self, requests: f64) -> (f64, f64) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / requests.max(1.0);
        (per(self.user), per(self.kernel))
    }
}

/// CPU time of the process `pid` (a number, or `self`), all its threads;
/// zero once it has exited.
pub fn process(pid: &str) -> CpuTime {
    read_stat(&format!("/proc/{pid}/stat"))
}

/// CPU time of this process's threads whose name starts with `prefix`
/// (serving names its threads `serving-<i>`).
pub fn threads(prefix: &str) -> CpuTime {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return CpuTime::default() };
    tasks
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(prefix)))
        .map(|task| read_stat(&task.path().join("stat").to_string_lossy()))
        .fold(CpuTime::default(), |sum, time| sum + time)
}

fn read_stat(path: &str) -> CpuTime {
    std::fs::read_to_string(path).map_or(CpuTime::default(), |text| parse_stat(&text, clock_ticks_per_second()))
}

/// `utime` and `stime` of a `stat` line (proc(5)): the 14th and 15th
/// fields, in clock ticks. The 2nd is the name in parentheses, which may
/// itself hold spaces and parentheses, so fields are counted from after
/// its last `)`, where the 3rd begins.
fn parse_stat(text: &str, ticks_per_second: f64) -> CpuTime {
    let fields: Vec<&str> = text.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let time = |field: usize| {
        let ticks = fields.get(field - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Duration::from_secs_f64(ticks as f64 / ticks_per_second)
    };
    CpuTime { user: time(14), kernel: time(15) }
}

/// The kernel's clock tick (`getconf CLK_TCK`), 100 on Linux where it
/// cannot be read.
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .filter(|&ticks: &f64| ticks > 0.0)
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_kernel_time_are_read_past_a_name_with_spaces_and_parentheses() {
        // pid, name, then state and fields 4..13, utime 250 and stime 1250
        // ticks, then the rest.
        let line = "4242 (serving-0 (x) y) S 1 2 3 4 5 6 7 8 9 10 250 1250 0 0 20 0 1 0 100 0 0";
        let time = parse_stat(line, 100.0);
        assert_eq!(time, CpuTime { user: Duration::from_millis(2500), kernel: Duration::from_millis(12500) });
        assert_eq!(time.per_request_us(1_000_000.0), (2.5, 12.5));
        assert_eq!(parse_stat("", 100.0), CpuTime::default());
    }

    #[test]
    fn this_thread_s_own_work_counts_as_user_time() {
        // A fixed amount of work (not a duration): at least one clock tick
        // of it however slow the machine, and none of it in the kernel.
        let this_thread = || read_stat("/proc/thread-self/stat");
        let before = this_thread();
        let mut state = 1u64;
        for _ in 0..50_000_000u64 {
            state = std::hint::black_box(state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
        }
        let used = this_thread() - before;
        assert!(used.user > Duration::ZERO, "{used:?}");
        assert!(used.user > used.kernel, "{used:?}");
    }
}
