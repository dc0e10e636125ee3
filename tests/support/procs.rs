//! Processes seen from outside, as an operator would with `ps`.

/// Pids of the children of `parent` whose command is `name` (zombies
/// included: a child not reaped yet still counts).
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // pid (comm) state ppid ...
            let close = stat.rfind(')')?;
            let comm = stat[..close].split('(').nth(1)?;
            let ppid: u32 = stat.get(close + 2..)?.split(' ').nth(1)?.parse().ok()?;
            (comm == name && ppid == parent).then_some(pid)
        })
        .collect()
}
