//! [`ConfigError`]: what went wrong, where, rendered one problem per line.

use std::fmt;
use std::path::{Path, PathBuf};

/// One mistake in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based `(line, column)`; `None` when the parser could not tell.
    pub at: Option<(u64, u64)>,
    /// Key path such as `streams[1].failover_urls[0]`; empty for the whole
    /// document.
    pub path: String,
    /// Single line, user-facing.
    pub message: String,
}

impl Problem {
    pub(super) fn new(at: Option<(u64, u64)>, path: &str, message: &str) -> Self {
        // Both quote what the user wrote; a stray newline there must not break
        // the one-problem-per-line contract.
        Self {
            at,
            path: one_line(path),
            message: one_line(message),
        }
    }

    fn render(&self, file: &Path) -> String {
        let mut out = file.display().to_string();
        if let Some((line, column)) = self.at {
            out.push_str(&format!(":{line}:{column}"));
        }
        out.push_str(": ");
        if !self.path.is_empty() {
            out.push_str(&self.path);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

fn one_line(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_debug().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        s.to_owned()
    }
}

/// Why the config could not be loaded. `Display` gives one line per problem:
/// `FILE:LINE:COL: key.path: message`, or `FILE: cannot read: ...`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error` is deliberately not `#[source]`: its text is already in the
    // message, and error-chain printers would otherwise repeat it.
    #[error("{}: cannot read: {error}", file.display())]
    Io {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{}", Lines(file, problems))]
    Invalid {
        file: PathBuf,
        /// In file order as far as possible; never empty.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The lines of `Display`, one per problem.
    pub fn messages(&self) -> Vec<String> {
        match self {
            ConfigError::Io { .. } => vec![self.to_string()],
            ConfigError::Invalid { file, problems } => {
                problems.iter().map(|p| p.render(file)).collect()
            }
        }
    }

    /// The individual problems (empty for I/O errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Io { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

struct Lines<'a>(&'a Path, &'a [Problem]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&problem.render(self.0))?;
        }
        Ok(())
    }
}
