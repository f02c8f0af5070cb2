//! A Kafka-protocol broker in the test process (noida-db's Kafka engine, a dev-dependency), for tests
//! and benchmarks of the Kafka path that have no external broker (`SLUICE_TEST_BROKERS`).
//!
//! It holds its log in memory and snapshots it to `kafka.json` in `data_dir` every
//! `snapshot_interval` and when dropped. It is a test broker, not a hand-off for real data: the
//! local log is that (see `sluice::handoff`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A running embedded broker. Dropping it takes a last snapshot.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    save: Arc<dyn Fn() + Send + Sync>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
}

impl EmbeddedBroker {
    /// Starts a broker on `bind` (port 0 picks a free port) with its snapshot in `data_dir`.
    ///
    /// # Errors
    /// A message when the data directory or the port cannot be used.
    pub fn start(bind: &str, data_dir: &Path, snapshot_interval: Duration) -> Result<Self, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let (addr, save) = noida::kafka::spawn_persistent_for_test(bind, data_dir)
            .map_err(|e| format!("cannot start on {bind}: {e}"))?;
        let save: Arc<dyn Fn() + Send + Sync> = Arc::new(save);
        let stop = Arc::new(AtomicBool::new(false));
        let (saver, stopped) = (save.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sluice-broker-snapshot".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(snapshot_interval);
                    saver();
                }
            })
            .map_err(|e| format!("snapshot thread: {e}"))?;
        Ok(EmbeddedBroker { addr, save, stop, dir: data_dir.to_owned() })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Writes a snapshot now.
    pub fn snapshot(&self) {
        (self.save)();
    }

    /// The folder holding the snapshot.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        (self.save)();
    }
}
