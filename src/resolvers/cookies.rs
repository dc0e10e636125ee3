//! Cookies files (Netscape format) for resolvers: confined to
//! `resolvers.cookies_dir`, checked for shape, never echoed.

use std::path::{Path, PathBuf};

/// What a check of a cookies file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub valid: bool,
    pub message: String,
}

impl Checked {
    fn no(message: impl Into<String>) -> Self {
        Checked {
            valid: false,
            message: message.into(),
        }
    }
}

/// `path` (relative to `dir`, or absolute) as a file inside `dir`, after
/// symlinks and `..` are resolved; `Err` says why not, without saying
/// whether a file outside exists.
pub fn confine(dir: Option<&Path>, path: &str) -> Result<PathBuf, String> {
    let Some(dir) = dir else {
        return Err("cookies files are not enabled: set resolvers.cookies_dir".into());
    };
    if path.trim().is_empty() || path.contains('\0') {
        return Err("no cookies file named".into());
    }
    let outside = || format!("cookies files must be inside {}", dir.display());
    let root = dir
        .canonicalize()
        .map_err(|_| format!("{} is not readable", dir.display()))?;
    let asked = Path::new(path);
    let joined = if asked.is_absolute() {
        asked.to_path_buf()
    } else {
        root.join(asked)
    };
    // Refuse by name first, so a path outside is refused whether or not it exists.
    if !joined.starts_with(&root) && !joined.starts_with(dir) {
        return Err(outside());
    }
    let real = joined
        .canonicalize()
        .map_err(|_| format!("{path}: no such cookies file"))?;
    if !real.starts_with(&root) {
        return Err(outside());
    }
    if !real.is_file() {
        return Err(format!("{path}: not a regular file"));
    }
    Ok(real)
}

/// Checks a Netscape cookies file: every non-comment line has 7
/// tab-separated fields with TRUE/FALSE flags and a numeric expiry.
pub fn check_text(text: &str, now_unix: i64) -> Checked {
    let (mut cookies, mut expired) = (0usize, 0usize);
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let line = line.strip_prefix("#HttpOnly_").unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 7 {
            return Checked::no(format!(
                "line {}: expected 7 tab-separated fields (Netscape format), found {}",
                i + 1,
                f.len()
            ));
        }
        let flag = |s: &str| matches!(s, "TRUE" | "FALSE");
        if !flag(f[1]) || !flag(f[3]) {
            return Checked::no(format!("line {}: the flags must be TRUE or FALSE", i + 1));
        }
        let Ok(expiry) = f[4].trim().parse::<i64>() else {
            return Checked::no(format!("line {}: the expiry is not a number", i + 1));
        };
        if f[0].is_empty() || f[5].is_empty() {
            return Checked::no(format!(
                "line {}: a cookie needs a domain and a name",
                i + 1
            ));
        }
        cookies += 1;
        // 0 = a session cookie, which does not expire.
        if expiry != 0 && expiry < now_unix {
            expired += 1;
        }
    }
    if cookies == 0 {
        return Checked::no("no cookies in the file");
    }
    if expired == cookies {
        return Checked::no(format!("all {cookies} cookies have expired"));
    }
    Checked {
        valid: true,
        message: if expired > 0 {
            format!("{cookies} cookies, {expired} expired")
        } else {
            format!("{cookies} cookies")
        },
    }
}

/// `GET /validate-cookies-file?path=`: confined, readable, well-formed.
pub fn validate(dir: Option<&Path>, path: &str, now_unix: i64) -> Checked {
    let real = match confine(dir, path) {
        Ok(p) => p,
        Err(why) => return Checked::no(why),
    };
    // Cookies files are small; a huge one is not a cookies file.
    match std::fs::metadata(&real) {
        Ok(m) if m.len() > 4 * 1024 * 1024 => {
            return Checked::no(format!("{path}: larger than 4 MiB"))
        }
        Ok(_) => {}
        Err(_) => return Checked::no(format!("{path}: not readable")),
    }
    match std::fs::read_to_string(&real) {
        Ok(text) => check_text(&text, now_unix),
        Err(_) => Checked::no(format!("{path}: not readable as text")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# Netscape HTTP Cookie File\n.example.com\tTRUE\t/\tTRUE\t4102444800\tSID\tsecret-value\n#HttpOnly_.example.com\tTRUE\t/\tFALSE\t0\tHSID\tother\n";

    #[test]
    fn netscape_files_are_checked_and_values_never_echoed() {
        let c = check_text(GOOD, 1_700_000_000);
        assert!(c.valid, "{c:?}");
        assert_eq!(c.message, "2 cookies");
        assert!(!c.message.contains("secret"));
        let old = GOOD.replace("4102444800", "1000");
        assert_eq!(
            check_text(&old, 1_700_000_000).message,
            "2 cookies, 1 expired"
        );
        let all_old = "a.com\tTRUE\t/\tFALSE\t1000\tn\tv\n";
        assert!(!check_text(all_old, 1_700_000_000).valid);
        let bad = check_text("a.com TRUE / FALSE 0 n v\n", 0);
        assert!(!bad.valid && bad.message.contains("line 1"), "{bad:?}");
        assert!(!check_text("# only a comment\n", 0).valid);
        let crlf = GOOD.replace('\n', "\r\n");
        assert!(check_text(&crlf, 0).valid);
    }

    #[test]
    fn paths_are_confined_to_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("yt.txt"), GOOD).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.txt"), GOOD).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x.txt"), root.join("link.txt")).unwrap();
        assert!(validate(Some(root), "yt.txt", 0).valid);
        assert!(validate(Some(root), &root.join("yt.txt").display().to_string(), 0).valid);
        for bad in [
            "../x.txt",
            "link.txt",
            "sub",
            "missing.txt",
            "/etc/passwd",
            "",
        ] {
            assert!(!validate(Some(root), bad, 0).valid, "{bad}");
        }
        let p = outside.path().join("x.txt").display().to_string();
        let c = validate(Some(root), &p, 0);
        assert!(!c.valid && c.message.contains("must be inside"), "{c:?}");
        assert!(validate(None, "yt.txt", 0).message.contains("cookies_dir"));
    }
}
