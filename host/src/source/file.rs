//! A file source: a recording of raw frames, one per line, replayed once through the same queue and
//! decode path as a live feed, at a set rate or as fast as decode takes them.
//!
//! Unlike a venue, a file can wait: a full queue holds the replay back instead of dropping frames,
//! so a replay delivers every line (blank lines are skipped; a line longer than `max_frame_bytes` is
//! cut and dead-lettered, as a live frame would be).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Frame, SourceStats, State};
use crate::clock::now_us;
use crate::source::config::SourceConfig;

/// Replays `config.path` into `out`, then stops (the source shows as stopped). Never panics on a
/// bad file: a file that cannot be read is logged and counted as nothing read.
pub async fn replay(
    config: Arc<SourceConfig>,
    id: u32,
    out: mpsc::Sender<Frame>,
    stats: Arc<SourceStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(path) = config.path.clone() else {
        stats.set_state(State::Stopped);
        return;
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(source = %config.name, path = %path.display(), error = %e, "cannot read the recording");
            stats.set_state(State::Stopped);
            return;
        }
    };
    stats.set_state(State::Up);
    let mut lines = tokio::io::BufReader::with_capacity(1 << 16, file).split(b'\n');
    let started = Instant::now();
    let (mut sent, mut line_no) = (0u64, 0u64);
    loop {
        let line = tokio::select! {
            line = lines.next_segment() => line,
            _ = shutdown.changed() => break,
        };
        let mut line = match line {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(source = %config.name, line = line_no + 1, error = %e, "reading the recording failed");
                break;
            }
        };
        line_no += 1;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        // Paced: frame n goes out at n / rate seconds after the start.
        if config.rate > 0.0 {
            let due = started + Duration::from_secs_f64(sent as f64 / config.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.changed() => break,
            }
        }
        let received_at_us = now_us();
        stats.frames.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
        stats.last_message_us.store(received_at_us, Ordering::Relaxed);
        let oversized = (line.len() > config.max_frame_bytes).then_some(line.len());
        if oversized.is_some() {
            stats.oversized.fetch_add(1, Ordering::Relaxed);
            line.truncate(config.max_frame_bytes);
        }
        let frame = Frame { source: id, received_at_us, bytes: Bytes::from(line), oversized, overlap: false };
        tokio::select! {
            sent_ok = out.send(frame) => if sent_ok.is_err() { break },
            _ = shutdown.changed() => break,
        }
        sent += 1;
    }
    tracing::info!(source = %config.name, path = %path.display(), frames = sent, lines = line_no, "replay finished");
    stats.set_state(State::Stopped);
}
