//! Shared pieces of the load harnesses (`weft-load`, `weft-dnsload`).

/// CPU time (user plus system) a process has used, in clock ticks (0 if it is gone).
pub fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = cpu_ticks_split(pid);
    user + system
}

/// The user and the system (kernel) CPU time a process has used, in clock ticks (0 if it is
/// gone): fields 14 and 15 of `/proc/PID/stat`, counted after the command name (which may hold
/// spaces).
pub fn cpu_ticks_split(pid: u32) -> (u64, u64) {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            // After the name: state (3), ..., utime (14), stime (15).
            let mut f = rest.split_whitespace().skip(11);
            let user: u64 = f.next()?.parse().ok()?;
            let system: u64 = f.next()?.parse().ok()?;
            Some((user, system))
        })
        .unwrap_or((0, 0))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 where it cannot be asked).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// VmRSS of a process in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_ticks_of_this_process_grow_with_work() {
        let me = std::process::id();
        let start = super::cpu_ticks(me);
        let mut x = 0u64;
        // Spin until the kernel has charged at least one tick more (a few ms of CPU).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::cpu_ticks(me) == start && std::time::Instant::now() < deadline {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        assert!(super::cpu_ticks(me) > start);
        assert!(super::clock_ticks_per_second() > 0.0);
    }
}
