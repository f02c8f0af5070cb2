//! The queue from the sources to a decode worker, bounded in frames and in bytes: a count alone lets
//! 16,384 frames of up to `max_frame_bytes` each hold gigabytes.
//!
//! The bytes are counted with a semaphore of one permit per byte: a source takes a frame's permits
//! before queueing it and the worker gives them back as it takes the frame off. A live source that
//! finds either bound reached drops the frame (and counts it); a file source waits for room.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use super::Frame;

/// A queue that holds at most `frames` frames and `bytes` bytes of payload (at most 4 GiB). A frame
/// larger than `bytes` still goes through, when the queue is empty.
pub fn channel(frames: usize, bytes: usize) -> (FrameSender, FrameReceiver) {
    let capacity = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
    let room = Arc::new(Semaphore::new(capacity as usize));
    let (tx, rx) = mpsc::channel(frames.max(1));
    (FrameSender { tx, room: room.clone(), capacity }, FrameReceiver { rx, room, capacity })
}

/// Why [`FrameSender::try_send`] did not queue a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds as many frames or bytes as it may.
    Full,
    /// The worker is gone (the pipeline is stopping).
    Closed,
}

/// The sources' end of the queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct FrameSender {
    tx: mpsc::Sender<Frame>,
    /// One permit per byte of room left.
    room: Arc<Semaphore>,
    capacity: u32,
}

impl FrameSender {
    /// Queues `frame` if both bounds allow it now; never waits.
    ///
    /// # Errors
    /// [`Refused::Full`] when either bound is reached, [`Refused::Closed`] when the worker is gone.
    pub fn try_send(&self, frame: Frame) -> Result<(), Refused> {
        let permit = match self.room.try_acquire_many(cost(&frame, self.capacity)) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(Refused::Full),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Refused::Closed),
        };
        match self.tx.try_send(frame) {
            Ok(()) => {
                // Given back by the receiver when it takes the frame.
                permit.forget();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Refused::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Closed),
        }
    }

    /// Queues `frame`, waiting for room in both bounds.
    ///
    /// # Errors
    /// [`Refused::Closed`] when the worker is gone.
    pub async fn send(&self, frame: Frame) -> Result<(), Refused> {
        let permit = self.room.acquire_many(cost(&frame, self.capacity)).await.map_err(|_| Refused::Closed)?;
        self.tx.send(frame).await.map_err(|_| Refused::Closed)?;
        permit.forget();
        Ok(())
    }
}

/// The worker's end of the queue.
#[derive(Debug)]
pub struct FrameReceiver {
    rx: mpsc::Receiver<Frame>,
    room: Arc<Semaphore>,
    capacity: u32,
}

impl FrameReceiver {
    /// The next frame, waiting for one (on a thread outside the async runtime); `None` once every
    /// sender is gone and the queue is empty.
    pub fn blocking_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.blocking_recv()?;
        Some(self.taken(frame))
    }

    /// The next frame, waiting for one; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        Some(self.taken(frame))
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        Some(self.taken(frame))
    }

    /// Gives the frame's bytes back to the senders.
    fn taken(&self, frame: Frame) -> Frame {
        self.room.add_permits(cost(&frame, self.capacity) as usize);
        frame
    }
}

impl Drop for FrameReceiver {
    /// Senders waiting for room learn that the worker is gone.
    fn drop(&mut self) {
        self.room.close();
    }
}

/// The permits a frame takes: its length, at most the whole queue (so any frame fits an empty one).
fn cost(frame: &Frame, capacity: u32) -> u32 {
    u32::try_from(frame.bytes.len()).unwrap_or(u32::MAX).min(capacity)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn frame(len: usize) -> Frame {
        Frame {
            source: 1,
            received_at_us: 0,
            bytes: Bytes::from(vec![b'x'; len]),
            oversized: None,
            overlap: false,
            file_offset: 0,
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_as_well_as_frames() {
        let (tx, mut rx) = channel(100, 10_000);
        tx.try_send(frame(4_000)).unwrap();
        tx.try_send(frame(4_000)).unwrap();
        // Three frames of 4,000 bytes exceed 10,000 bytes, though 100 frames would fit.
        assert_eq!(tx.try_send(frame(4_000)), Err(Refused::Full));
        tx.try_send(frame(2_000)).unwrap();
        // Taking a frame off gives its bytes back.
        assert_eq!(rx.try_recv().unwrap().bytes.len(), 4_000);
        tx.try_send(frame(4_000)).unwrap();
        // A frame larger than the whole queue passes once the queue is empty.
        let (tx, mut rx) = channel(100, 1_000);
        tx.try_send(frame(5_000)).unwrap();
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
        assert_eq!(rx.recv().await.unwrap().bytes.len(), 5_000);
        tx.try_send(frame(1)).unwrap();
        // The frame bound holds too.
        let (tx, _rx) = channel(2, 1 << 20);
        tx.try_send(frame(1)).unwrap();
        tx.try_send(frame(1)).unwrap();
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
    }

    #[tokio::test]
    async fn a_waiting_sender_goes_on_when_bytes_are_taken_off() {
        let (tx, mut rx) = channel(100, 10_000);
        tx.send(frame(8_000)).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(frame(8_000)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "8,000 more bytes do not fit");
        rx.recv().await.unwrap();
        waiting.await.unwrap().unwrap();
        // A sender waiting for room when the worker goes is told so.
        let stuck = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(frame(8_000)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(rx);
        assert_eq!(stuck.await.unwrap(), Err(Refused::Closed));
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Closed));
    }
}
