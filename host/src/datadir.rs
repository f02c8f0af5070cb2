//! Who owns a data directory. One process writes a data directory's local log, store and plugin
//! registry: `sluice run` and `sluice demo` take an exclusive lock on `<data_dir>/sluice.lock` at
//! start and hold it for their life, so a second one on the same directory is refused with the
//! owner's PID (which the file holds as text) instead of appending to the same log and rolling
//! up the same records twice.
//!
//! The lock is an `flock` on the open file ([`std::fs::File::try_lock`]): the kernel releases it
//! when the process ends, however it ends (kill -9 too), so a stale file never keeps a restart out.
//!
//! The roles run apart (`--role ingest`, `--role process`, on Kafka) share a directory on purpose
//! (several process instances of one consumer group, beside the ingest role): each takes the lock
//! shared, which keeps out a whole `run` or `demo` and is kept out by one. `sluice replay` takes no
//! lock: it runs beside the live role by design.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "sluice.lock";

/// Why the data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "the data directory {} is in use by another sluice process (PID {holder}): one process owns a \
         data directory; stop that one, or give this one a data_dir of its own",
        dir.display()
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The holder's PID as its lock file reads (`unknown` when it has not written it yet).
        holder: String,
    },
    /// The directory or its lock file could not be created, opened or locked.
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// How a process holds the data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Alone: a whole `run` (both roles) or `demo`.
    Alone,
    /// Beside other processes that hold it shared: a role run apart.
    Shared,
}

/// The data directory, held: the lock lasts as long as this value (keep it for the process's life).
#[derive(Debug)]
pub struct DataDirLock {
    /// The open lock file; closing it releases the lock.
    _file: File,
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it as `hold` says, writing this process's PID into the
    /// lock file.
    ///
    /// # Errors
    /// [`LockError::Held`] naming the holder's PID when another process holds it (alone, or shared
    /// when `hold` is [`Hold::Alone`]); [`LockError::Io`] when the directory or file cannot be
    /// used.
    pub fn acquire(dir: &Path, hold: Hold) -> Result<Self, LockError> {
        let io = |source| LockError::Io { dir: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Not truncated on open: until the lock is taken, the PID in it is the holder's.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        let taken = match hold {
            Hold::Alone => file.try_lock(),
            Hold::Shared => file.try_lock_shared(),
        };
        match taken {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("unknown").to_owned();
                return Err(LockError::Held { dir: dir.to_owned(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::{DataDirLock, Hold, LOCK_FILE, LockError};

    #[test]
    fn a_directory_held_alone_refuses_everyone_and_shared_holders_refuse_only_a_whole_run() {
        let dir = std::env::temp_dir().join(format!("sluice-datadir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pid = std::process::id().to_string();
        let alone = DataDirLock::acquire(&dir, Hold::Alone).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap().trim(), pid);
        for hold in [Hold::Alone, Hold::Shared] {
            match DataDirLock::acquire(&dir, hold) {
                Err(LockError::Held { holder, .. }) => assert_eq!(holder, pid),
                other => panic!("{other:?}"),
            }
        }
        drop(alone);
        let shared =
            [DataDirLock::acquire(&dir, Hold::Shared).unwrap(), DataDirLock::acquire(&dir, Hold::Shared).unwrap()];
        let err = DataDirLock::acquire(&dir, Hold::Alone).unwrap_err();
        assert!(err.to_string().contains(&format!("PID {pid}")), "{err}");
        drop(shared);
        DataDirLock::acquire(&dir, Hold::Alone).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
