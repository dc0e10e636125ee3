//! The state file: API-created streams (and, as they land, other runtime state)
//! survive a restart. Writes are atomic (temp file + fsync + rename) so a crash
//! never leaves half a file; a file that cannot be read is reported and moved
//! aside, never silently dropped.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::events::Webhook;
use crate::registry::PersistedStream;

/// Bumped when the format changes incompatibly.
const STATE_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateData {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub streams: Vec<PersistedStream>,
    /// Hex HMAC key of the HLS references, kept so minted URIs survive a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls_key: Option<String>,
    /// Webhooks registered through the API (YAML ones come from the config).
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot write state: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot serialize state: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub struct StateFile {
    path: PathBuf,
    /// Serializes writers so two saves never interleave their temp files.
    lock: Mutex<()>,
}

/// What loading found, for the start-up log.
#[derive(Debug)]
pub enum Loaded {
    Missing,
    Ok(StateData),
    /// Unreadable: moved to the given path, starting empty.
    Corrupt {
        moved_to: PathBuf,
        error: String,
    },
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile {
            path,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Loaded {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => return self.move_aside(format!("cannot read: {e}")),
        };
        match serde_json::from_slice::<StateData>(&text) {
            Ok(d) if d.version <= STATE_VERSION => Loaded::Ok(d),
            Ok(d) => self.move_aside(format!(
                "state version {} is newer than this m3u-edge understands ({STATE_VERSION})",
                d.version
            )),
            Err(e) => self.move_aside(format!("not valid state JSON: {e}")),
        }
    }

    fn move_aside(&self, error: String) -> Loaded {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
        let mut moved_to = self.path.clone().into_os_string();
        moved_to.push(format!(".corrupt-{stamp}"));
        let moved_to = PathBuf::from(moved_to);
        match fs::rename(&self.path, &moved_to) {
            Ok(()) => Loaded::Corrupt { moved_to, error },
            Err(e) => Loaded::Corrupt {
                moved_to: self.path.clone(),
                error: format!("{error}; could not move it aside: {e}"),
            },
        }
    }

    /// Writes the whole state atomically.
    pub fn save(&self, mut data: StateData) -> Result<(), StateError> {
        data.version = STATE_VERSION;
        let body = serde_json::to_vec_pretty(&data).map_err(|source| StateError::Encode {
            path: self.path.clone(),
            source,
        })?;
        let _guard = self.lock.lock();
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)?;
            }
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::write(&p, b"{not json").unwrap();
        let s = StateFile::new(p.clone());
        match s.load() {
            Loaded::Corrupt { moved_to, .. } => {
                assert!(moved_to.exists());
                assert!(!p.exists());
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateFile::new(dir.path().join("sub/state.json"));
        s.save(StateData::default()).unwrap();
        assert!(matches!(s.load(), Loaded::Ok(d) if d.streams.is_empty()));
    }
}
