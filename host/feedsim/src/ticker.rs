//! The ticking of one feed: trades generated at the configured rate, rendered into the venue's
//! frames and broadcast to every subscribed connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::feed::{Feed, Frame, Generator, SentTrade, Trade, now_us};
use super::venue;

/// The most trades one wake-up of a generator produces; after a long stall the rest are not made up.
const MAX_TRADES_PER_WAKE: u64 = 10_000;

/// Runs one feed's generator until shutdown: `rate` trades per second, rendered into frames and
/// broadcast to every subscribed connection.
pub(super) async fn run(
    feed: Arc<Feed>,
    mut generator: Generator,
    rate: f64,
    mut shutdown: watch::Receiver<bool>,
    _running: mpsc::Sender<()>,
) {
    if rate <= 0.0 {
        let _ = shutdown.wait_for(|stop| *stop).await;
        return;
    }
    let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let started = Instant::now();
    // The first trade goes out at once, so a fresh subscriber sees data without waiting a period.
    let mut made: u64 = 0;
    let mut trades = Vec::with_capacity(3);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
        made = made.max(due.saturating_sub(MAX_TRADES_PER_WAKE));
        while made < due {
            let burst = generator.burst(feed.venue);
            made += burst;
            let time_us = now_us();
            trades.clear();
            for _ in 0..burst {
                let trade = generator.trade(time_us);
                if feed.take_skip() {
                    feed.record().skipped.insert(trade.id);
                    // Keep each frame's ids consecutive: a gap ends the frame.
                    publish(&feed, &generator, &mut trades);
                } else {
                    trades.push(trade);
                }
            }
            publish(&feed, &generator, &mut trades);
        }
    }
}

/// Renders and broadcasts the trades gathered for one frame, if any.
fn publish(feed: &Feed, generator: &Generator, trades: &mut Vec<Trade>) {
    let (Some(first), Some(last)) = (trades.first(), trades.last()) else { return };
    if feed.record_trades {
        let mut record = feed.record();
        for t in trades.iter() {
            let sent = SentTrade {
                id: t.id,
                price_e8: t.price_e8,
                size_e8: t.size_e8,
                taker_buys: t.taker_buys,
                time_us: t.time_us,
            };
            record.trades.insert(t.id, sent);
        }
    }
    let frame = Frame { text: venue::trade_frame(feed, generator.decimals, trades).into(), ids: first.id..=last.id };
    feed.publish(frame, trades, generator.decimals);
    trades.clear();
}
