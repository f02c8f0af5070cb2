//! A file source: a recording of raw frames, one per line, replayed through the same queue and
//! decode path as a live feed, at a set rate or as fast as decode takes them.
//!
//! Unlike a venue, a file can wait: a full queue holds the replay back instead of dropping frames,
//! so a replay delivers every line (blank lines are skipped; a line longer than `max_frame_bytes` is
//! cut and dead-lettered, as a live frame would be: only its first `max_frame_bytes` are kept, the
//! rest is read past up to the next newline, so a line without end costs no memory).
//!
//! Each frame carries the byte offset just past its line, and the log commits the furthest offset
//! delivered with the batch that delivered it (a [`FileMark`]). A restart ([`resume`]) goes on from
//! the next line not yet logged, once it has checked that the file is the same recording: its first
//! 64 KiB hash the same and it is at least as long as the position. A changed recording is refused,
//! or read from its start when the source says `if_changed = "reread"`. A recording read to its end
//! shows as *finished*, and a restart does not read it again (lines appended since are read).

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::queue::FrameSender;
use super::{Frame, SourceStats, State};
use crate::clock::now_us;
use crate::handoff::marks::{FileIdentity, FileMark};
use crate::source::config::{IfChanged, SourceConfig};

/// How many bytes from a recording's start identify it.
const HEAD_BYTES: u64 = 64 * 1024;

/// Where a file source starts: the recording's identity and the offset of its first line to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStart {
    /// The recording, as marks will name it.
    pub identity: FileIdentity,
    /// The byte offset to read from.
    pub offset: u64,
}

/// Why a file source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The recording cannot be read.
    #[error("source {source_name:?}: cannot read the recording {path}: {error}")]
    Unreadable {
        /// The source.
        source_name: String,
        /// The file.
        path: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The file at the path is not the recording the source was reading before.
    #[error(
        "source {source_name:?}: the recording {path} changed since it was read up to byte {offset} ({why}); \
         restore the original file, or set if_changed = \"reread\" on the source to read the new one from its start"
    )]
    Changed {
        /// The source.
        source_name: String,
        /// The file.
        path: String,
        /// The position reached before.
        offset: u64,
        /// What differs.
        why: String,
    },
}

/// The identity of the file at `path` as it is now: SHA-256 of its first [`HEAD_BYTES`] (or
/// `head_len` bytes when given), and its length.
fn identify(path: &std::path::Path, head_len: Option<u64>) -> std::io::Result<(FileIdentity, u64)> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let want = head_len.unwrap_or(HEAD_BYTES.min(len));
    let mut head = Vec::with_capacity(want.min(HEAD_BYTES) as usize);
    (&mut file).take(want).read_to_end(&mut head)?;
    let identity = FileIdentity {
        path: path.display().to_string(),
        head_len: head.len() as u64,
        head_sha256: Sha256::digest(&head).into(),
    };
    Ok((identity, len))
}

/// Where `config`'s recording starts, given the mark the log kept for it (if any): the mark's offset
/// when the file is the same recording, the start when there is no mark or the path changed.
///
/// # Errors
/// [`FileError::Unreadable`] when the file cannot be read; [`FileError::Changed`] when it is not the
/// recording the mark names and the source does not say `if_changed = "reread"`.
pub fn resume(config: &SourceConfig, mark: Option<&FileMark>) -> Result<FileStart, FileError> {
    let path = config.path.clone().unwrap_or_default();
    let unreadable =
        |error| FileError::Unreadable { source_name: config.name.clone(), path: path.display().to_string(), error };
    let (identity, _) = identify(&path, None).map_err(unreadable)?;
    let Some(mark) = mark.filter(|m| m.identity.path == identity.path) else {
        return Ok(FileStart { identity, offset: 0 });
    };
    // The head the mark hashed, as long as it was then (a recording may have grown since).
    let (then, len) = identify(&path, Some(mark.identity.head_len)).map_err(unreadable)?;
    let why = if len < mark.offset {
        Some(format!("it is {len} bytes long now"))
    } else if then.head_len != mark.identity.head_len || then.head_sha256 != mark.identity.head_sha256 {
        Some(format!("its first {} bytes differ", mark.identity.head_len))
    } else {
        None
    };
    match (why, config.if_changed) {
        (None, _) => Ok(FileStart { identity, offset: mark.offset }),
        (Some(why), IfChanged::Reread) => {
            tracing::warn!(source = %config.name, path = %identity.path, %why, "the recording changed; reading it from its start");
            Ok(FileStart { identity, offset: 0 })
        }
        (Some(why), IfChanged::Refuse) => {
            Err(FileError::Changed { source_name: config.name.clone(), path: identity.path, offset: mark.offset, why })
        }
    }
}

/// Replays `config.path` from `start` into `out`, then shows the source as finished. Never panics on
/// a bad file: a file that cannot be read is logged and counted as nothing read.
pub async fn replay(
    config: Arc<SourceConfig>,
    id: u32,
    start: u64,
    out: FrameSender,
    stats: Arc<SourceStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(path) = config.path.clone() else {
        stats.set_state(State::Stopped);
        return;
    };
    let Some(file) = open_at(&config.name, &path, start).await else {
        stats.set_state(State::Stopped);
        return;
    };
    stats.set_state(State::Up);
    let mut lines = tokio::io::BufReader::with_capacity(1 << 16, file);
    let started = Instant::now();
    let (mut sent, mut offset) = (0u64, start);
    let mut finished = false;
    // What is kept of the current line: at most `max_frame_bytes`, reused line after line.
    let mut line = Vec::new();
    loop {
        let read = tokio::select! {
            read = read_line(&mut lines, &mut line, config.max_frame_bytes) => read,
            _ = shutdown.changed() => break,
        };
        let len = match read {
            Ok((0, _)) => {
                finished = true;
                break;
            }
            Ok((n, len)) => {
                offset += n as u64;
                len
            }
            Err(e) => {
                tracing::error!(source = %config.name, offset, error = %e, "reading the recording failed");
                break;
            }
        };
        if len == 0 {
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
        let frame = counted_frame(&stats, id, &line, len, offset, config.max_frame_bytes);
        tokio::select! {
            sent_ok = out.send(frame) => if sent_ok.is_err() { break },
            _ = shutdown.changed() => break,
        }
        sent += 1;
    }
    tracing::info!(source = %config.name, path = %path.display(), frames = sent, from = start, to = offset, finished, "replay finished");
    stats.set_state(if finished { State::Finished } else { State::Stopped });
}

/// Opens the recording and moves to `start`; a file that cannot be opened or sought is logged.
async fn open_at(source: &str, path: &std::path::Path, start: u64) -> Option<tokio::fs::File> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(source, path = %path.display(), error = %e, "cannot read the recording");
            return None;
        }
    };
    if start > 0
        && let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await
    {
        tracing::error!(source, path = %path.display(), error = %e, "cannot seek in the recording");
        return None;
    }
    Some(file)
}

/// Counts a line of `len` bytes (`kept` holds at most `max` of them) in the source's stats and
/// makes it a frame ending at `offset` in the file.
fn counted_frame(stats: &SourceStats, id: u32, kept: &[u8], len: usize, offset: u64, max: usize) -> Frame {
    let received_at_us = now_us();
    stats.frames.fetch_add(1, Ordering::Relaxed);
    stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
    stats.last_message_us.store(received_at_us, Ordering::Relaxed);
    let oversized = (len > max).then_some(len);
    if oversized.is_some() {
        stats.oversized.fetch_add(1, Ordering::Relaxed);
    }
    Frame {
        source: id,
        received_at_us,
        bytes: Bytes::copy_from_slice(kept),
        oversized,
        overlap: false,
        file_offset: offset,
    }
}

/// Reads the next line into `kept`, keeping at most `max` bytes of it; the rest is read and
/// dropped, so a line without end costs no memory. Answers the bytes read (0 at the end of the file)
/// and the line's length without its ending (the `\n` and any `\r` before it); `kept` holds the
/// whole line when that length is at most `max`.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    kept: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<(usize, usize)> {
    kept.clear();
    let (mut read, mut len, mut trailing_cr) = (0, 0, 0);
    loop {
        let (used, done) = {
            let available = reader.fill_buf().await?;
            if available.is_empty() {
                break;
            }
            let (chunk, done) = match memchr::memchr(b'\n', available) {
                Some(end) => (&available[..end], true),
                None => (available, false),
            };
            kept.extend_from_slice(&chunk[..chunk.len().min(max.saturating_sub(kept.len()))]);
            let crs = chunk.iter().rev().take_while(|&&b| b == b'\r').count();
            trailing_cr = if crs == chunk.len() { trailing_cr + crs } else { crs };
            len += chunk.len();
            (chunk.len() + usize::from(done), done)
        };
        reader.consume(used);
        read += used;
        if done {
            break;
        }
    }
    let len = len - trailing_cr;
    kept.truncate(len);
    Ok((read, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(path: &std::path::Path, if_changed: IfChanged) -> SourceConfig {
        let mut c = SourceConfig::new("rec", "", "binance");
        c.kind = crate::source::config::SourceKind::File;
        c.path = Some(path.to_owned());
        c.if_changed = if_changed;
        c
    }

    /// A line longer than `max_frame_bytes` is cut and marked oversized, and what the frame keeps is
    /// `max_frame_bytes`, not a buffer the size of the line; reading goes on at the next line.
    #[tokio::test]
    async fn an_over_long_line_is_cut_without_keeping_the_line() {
        let dir = std::env::temp_dir().join(format!("sluice-file-long-line-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec.jsonl");
        let long = vec![b'x'; 3 << 20];
        std::fs::write(&path, [&b"first\n"[..], &long, b"\r\n\r\nlast\r\n"].concat()).unwrap();
        let mut config = source(&path, IfChanged::Refuse);
        config.max_frame_bytes = 1024;
        let (tx, mut rx) = crate::source::queue::channel(16, 1 << 20);
        let stats = Arc::new(SourceStats::default());
        let (_stop, stop_rx) = watch::channel(false);
        replay(Arc::new(config), 1, 0, tx, stats.clone(), stop_rx).await;
        let mut frames = Vec::new();
        while let Some(f) = rx.try_recv() {
            frames.push(f);
        }
        let seen: Vec<(usize, Option<usize>, u64)> =
            frames.iter().map(|f| (f.bytes.len(), f.oversized, f.file_offset)).collect();
        let long_end = 6 + (3 << 20) + 2;
        assert_eq!(seen, [(5, None, 6), (1024, Some(3 << 20), long_end as u64), (4, None, long_end as u64 + 8)]);
        assert_eq!(&frames[2].bytes[..], b"last");
        assert_eq!(stats.oversized.load(Ordering::Relaxed), 1);
        let cut = frames.swap_remove(1).bytes.try_into_mut().expect("the only reference");
        assert!(cut.capacity() < 4096, "the cut line holds {} bytes", cut.capacity());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn lines_are_read_to_their_end_and_kept_up_to_the_cap() {
        let text = b"ab\r\n\r\r\nabcdef\nabc\r\r\ntail";
        let mut reader = tokio::io::BufReader::with_capacity(2, &text[..]);
        let mut kept = Vec::new();
        let mut lines = Vec::new();
        loop {
            let (read, len) = read_line(&mut reader, &mut kept, 3).await.unwrap();
            if read == 0 {
                break;
            }
            lines.push((read, len, String::from_utf8(kept.clone()).unwrap()));
        }
        let want = [(4, 2, "ab"), (3, 0, ""), (7, 6, "abc"), (6, 3, "abc"), (4, 4, "tai")];
        assert_eq!(lines, want.map(|(r, l, k)| (r, l, k.to_owned())));
    }

    #[test]
    fn a_restart_goes_on_from_the_mark_unless_the_recording_changed() {
        let dir = std::env::temp_dir().join(format!("sluice-file-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec.jsonl");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        let config = source(&path, IfChanged::Refuse);
        let first = resume(&config, None).unwrap();
        assert_eq!(first.offset, 0);
        let mark = FileMark { source: 1, identity: first.identity.clone(), offset: 4 };
        assert_eq!(resume(&config, Some(&mark)).unwrap().offset, 4);
        // Grown by appending: the same recording.
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        let grown = resume(&config, Some(&mark)).unwrap();
        assert_eq!(grown.offset, 4);
        assert_eq!(grown.identity.head_len, 8);
        // Another recording under the same path: refused, naming the source and what differs.
        std::fs::write(&path, "x\ny\nz\n").unwrap();
        let err = resume(&config, Some(&mark)).unwrap_err().to_string();
        assert!(err.contains("\"rec\"") && err.contains("first 6 bytes differ") && err.contains("reread"), "{err}");
        // Cut short: refused too.
        std::fs::write(&path, "a\n").unwrap();
        let err = resume(&config, Some(&mark)).unwrap_err().to_string();
        assert!(err.contains("2 bytes long"), "{err}");
        // Unless the operator asks for it to be read again.
        std::fs::write(&path, "x\ny\nz\n").unwrap();
        assert_eq!(resume(&source(&path, IfChanged::Reread), Some(&mark)).unwrap().offset, 0);
        // A mark of another path is another recording: from the start.
        let moved = FileMark { identity: FileIdentity { path: "/elsewhere".into(), ..mark.identity.clone() }, ..mark };
        assert_eq!(resume(&config, Some(&moved)).unwrap().offset, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
