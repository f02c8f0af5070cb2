//! The queue from the sources to a decode worker, bounded in frames and in bytes: a count alone lets
//! 16,384 frames of up to `max_frame_bytes` each hold gigabytes.
//!
//! Both bounds are semaphores: one permit per frame and one per byte. A source takes a frame's
//! permits before queueing it and the worker gives them back as it takes the frame off. A live
//! source that finds either bound reached drops the frame (and counts it); a file source waits for
//! room.
//!
//! A source queues what one read of its socket delivered as one unit ([`FrameSender::try_send_all`]):
//! one pass through the semaphores and the channel, and at most one wake-up of the worker, for all
//! the frames of a burst instead of one per frame (a busy feed delivers dozens of frames per read).
//! The worker still takes frames off one at a time, in order; the permits of a unit go back when the
//! worker takes its first frame, so the bounds can be passed by at most the unit the worker is on.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{Semaphore, TryAcquireError, mpsc};

use super::Frame;

/// What goes through the channel: one frame, or a read's worth in order (no allocation for one).
#[derive(Debug)]
enum Unit {
    One(Frame),
    Many(Vec<Frame>),
}

/// A queue that holds at most `frames` frames and `bytes` bytes of payload (at most 4 GiB each). A
/// frame larger than `bytes` still goes through, when the queue is empty.
pub fn channel(frames: usize, bytes: usize) -> (FrameSender, FrameReceiver) {
    let capacity = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
    let slots = u32::try_from(frames).unwrap_or(u32::MAX).max(1);
    let room = Arc::new(Semaphore::new(capacity as usize));
    let places = Arc::new(Semaphore::new(slots as usize));
    // Unbounded: the frame bound is `places`, taken before anything is sent.
    let (tx, rx) = mpsc::unbounded_channel();
    (
        FrameSender { tx, room: room.clone(), places: places.clone(), capacity, slots },
        FrameReceiver { rx, room, places, capacity, slots, ready: VecDeque::new() },
    )
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
    tx: mpsc::UnboundedSender<Unit>,
    /// One permit per byte of room left.
    room: Arc<Semaphore>,
    /// One permit per frame of room left.
    places: Arc<Semaphore>,
    capacity: u32,
    slots: u32,
}

impl FrameSender {
    /// Queues `frame` if both bounds allow it now; never waits.
    ///
    /// # Errors
    /// [`Refused::Full`] when either bound is reached, [`Refused::Closed`] when the worker is gone.
    pub fn try_send(&self, frame: Frame) -> Result<(), Refused> {
        self.try_take(1, cost(&frame, self.capacity))?;
        self.tx.send(Unit::One(frame)).map_err(|_| Refused::Closed)
    }

    /// Queues the frames of `frames` in order, emptying it, and never waits: all of them as one unit
    /// when both bounds allow it, else one by one as far as room allows. Returns how many were
    /// refused for want of room (the last ones: a frame after a refused one is refused too, so what
    /// is queued is always a run from the start).
    ///
    /// # Errors
    /// [`Refused::Closed`] when the worker is gone (`frames` is emptied all the same).
    pub fn try_send_all(&self, frames: &mut Vec<Frame>) -> Result<u64, Refused> {
        match frames.len() {
            0 => return Ok(0),
            1 => {
                let Some(frame) = frames.pop() else { return Ok(0) };
                return match self.try_send(frame) {
                    Ok(()) => Ok(0),
                    Err(Refused::Full) => Ok(1),
                    Err(Refused::Closed) => Err(Refused::Closed),
                };
            }
            _ => {}
        }
        let len = frames.len();
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        let bytes = frames.iter().fold(0u32, |sum, f| sum.saturating_add(cost(f, self.capacity)));
        // Only a single frame may pass the byte bound (when the queue is empty): a unit larger than
        // the whole queue goes frame by frame.
        let whole = if bytes <= self.capacity { self.try_take(n, bytes) } else { Err(Refused::Full) };
        match whole {
            Ok(()) => {
                let unit = Unit::Many(std::mem::replace(frames, Vec::with_capacity(len)));
                return self.tx.send(unit).map(|()| 0).map_err(|_| Refused::Closed);
            }
            Err(Refused::Closed) => {
                frames.clear();
                return Err(Refused::Closed);
            }
            Err(Refused::Full) => {}
        }
        // Not all of them fit: as many as do, in order, as the frame-by-frame queue did.
        let mut refused = 0u64;
        for frame in frames.drain(..) {
            if refused > 0 {
                refused += 1;
                continue;
            }
            match self.try_send(frame) {
                Ok(()) => {}
                Err(Refused::Full) => refused += 1,
                Err(Refused::Closed) => {
                    return Err(Refused::Closed);
                }
            }
        }
        Ok(refused)
    }

    /// Takes `frames` places and `bytes` bytes of room now, or neither.
    fn try_take(&self, frames: u32, bytes: u32) -> Result<(), Refused> {
        let refused = |e| match e {
            TryAcquireError::NoPermits => Refused::Full,
            TryAcquireError::Closed => Refused::Closed,
        };
        let places = self.places.try_acquire_many(frames.min(self.slots)).map_err(refused)?;
        let room = self.room.try_acquire_many(bytes).map_err(refused)?;
        // Given back by the receiver when it takes the frames.
        places.forget();
        room.forget();
        Ok(())
    }

    /// Queues `frame`, waiting for room in both bounds.
    ///
    /// # Errors
    /// [`Refused::Closed`] when the worker is gone.
    pub async fn send(&self, frame: Frame) -> Result<(), Refused> {
        let place = self.places.acquire().await.map_err(|_| Refused::Closed)?;
        let room = self.room.acquire_many(cost(&frame, self.capacity)).await.map_err(|_| Refused::Closed)?;
        self.tx.send(Unit::One(frame)).map_err(|_| Refused::Closed)?;
        place.forget();
        room.forget();
        Ok(())
    }
}

/// The worker's end of the queue.
#[derive(Debug)]
pub struct FrameReceiver {
    rx: mpsc::UnboundedReceiver<Unit>,
    room: Arc<Semaphore>,
    places: Arc<Semaphore>,
    capacity: u32,
    slots: u32,
    /// The rest of the unit taken off last, in order.
    ready: VecDeque<Frame>,
}

impl FrameReceiver {
    /// The next frame, waiting for one (on a thread outside the async runtime); `None` once every
    /// sender is gone and the queue is empty.
    pub fn blocking_recv(&mut self) -> Option<Frame> {
        if let Some(frame) = self.ready.pop_front() {
            return Some(frame);
        }
        let unit = self.rx.blocking_recv()?;
        self.taken(unit)
    }

    /// The next frame, waiting for one; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Frame> {
        if let Some(frame) = self.ready.pop_front() {
            return Some(frame);
        }
        let unit = self.rx.recv().await?;
        self.taken(unit)
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Frame> {
        if let Some(frame) = self.ready.pop_front() {
            return Some(frame);
        }
        let unit = self.rx.try_recv().ok()?;
        self.taken(unit)
    }

    /// Gives the unit's places and bytes back to the senders (once for all its frames), keeps the
    /// frames after its first, and returns the first.
    fn taken(&mut self, unit: Unit) -> Option<Frame> {
        match unit {
            Unit::One(frame) => {
                self.places.add_permits(1);
                self.room.add_permits(cost(&frame, self.capacity) as usize);
                Some(frame)
            }
            Unit::Many(frames) => {
                let n = u32::try_from(frames.len()).unwrap_or(u32::MAX).min(self.slots);
                let bytes = frames.iter().fold(0u32, |sum, f| sum.saturating_add(cost(f, self.capacity)));
                self.places.add_permits(n as usize);
                self.room.add_permits(bytes as usize);
                self.ready.extend(frames);
                self.ready.pop_front()
            }
        }
    }
}

impl Drop for FrameReceiver {
    /// Senders waiting for room learn that the worker is gone.
    fn drop(&mut self) {
        self.room.close();
        self.places.close();
    }
}

/// The permits a frame takes: its length, at most the whole queue (so any frame fits an empty one).
fn cost(frame: &Frame, capacity: u32) -> u32 {
    u32::try_from(frame.bytes.len()).unwrap_or(u32::MAX).min(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Frame {
        Frame::filler(len)
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

    fn numbered(n: u32, len: usize) -> Vec<Frame> {
        (0..n).map(|i| Frame { source: i, ..frame(len) }).collect()
    }

    /// A read's frames go as one unit, come off one by one in order, and give their room back; what
    /// does not fit is refused from the first frame that does not, in order, and counted.
    #[tokio::test]
    async fn a_read_s_frames_go_as_one_unit_and_what_does_not_fit_is_refused_in_order() {
        let (tx, mut rx) = channel(10, 10_000);
        let mut frames = numbered(4, 1_000);
        assert_eq!(tx.try_send_all(&mut frames), Ok(0));
        assert!(frames.is_empty(), "the frames were taken");
        // 4 of 10 frames and 4,000 of 10,000 bytes taken: 8 more frames of 1,000 bytes do not fit
        // (frames), so the first 6 go and the last 2 are refused.
        let mut more: Vec<Frame> =
            numbered(8, 1_000).into_iter().map(|f| Frame { source: f.source + 4, ..f }).collect();
        assert_eq!(tx.try_send_all(&mut more), Ok(2));
        assert!(more.is_empty());
        let sources: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).map(|f| f.source).collect();
        assert_eq!(sources, (0..10).collect::<Vec<_>>());
        // Everything taken off: the whole room is back, in frames and in bytes.
        let mut again = numbered(10, 1_000);
        assert_eq!(tx.try_send_all(&mut again), Ok(0));
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
        assert_eq!(rx.recv().await.unwrap().source, 0);
        // The unit's room came back when its first frame was taken, though nine still wait in order.
        tx.try_send(frame(1)).unwrap();
        let rest: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).map(|f| f.source).collect();
        assert_eq!(rest, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]);
        // Bytes bound a unit too: 3 frames of 4,000 bytes take 12,000 of 10,000.
        let mut big = numbered(3, 4_000);
        assert_eq!(tx.try_send_all(&mut big), Ok(1));
        // A single frame goes alone; a gone worker is told.
        drop(rx);
        assert_eq!(tx.try_send_all(&mut numbered(1, 1)), Err(Refused::Closed));
        assert_eq!(tx.try_send_all(&mut numbered(3, 1)), Err(Refused::Closed));
        assert_eq!(tx.try_send_all(&mut Vec::new()), Ok(0));
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
