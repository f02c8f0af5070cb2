//! The embedded Kafka-protocol broker: with no `[kafka] brokers` configured, sluice runs one in
//! process (noida-db's Kafka engine) so the same producer and consumer code works on one machine with
//! no set-up.
//!
//! What it keeps: the broker holds its log in memory and snapshots it to `kafka.json` in the data
//! directory every `snapshot_interval` and on a clean stop; on start it loads the snapshot. A crash
//! (SIGKILL) loses what was written since the last snapshot. For production, configure `brokers`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::KafkaError;

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
    /// [`KafkaError::Embedded`] when the data directory or the port cannot be used.
    pub fn start(bind: &str, data_dir: &Path, snapshot_interval: Duration) -> Result<Self, KafkaError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| KafkaError::Embedded(format!("cannot create {}: {e}", data_dir.display())))?;
        let (addr, save) = noida::kafka::spawn_persistent_for_test(bind, data_dir)
            .map_err(|e| KafkaError::Embedded(format!("cannot start on {bind}: {e}")))?;
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
            .map_err(|e| KafkaError::Embedded(format!("snapshot thread: {e}")))?;
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
