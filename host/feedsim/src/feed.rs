//! One simulated market per (venue, symbol): the trade generator, its broadcast channel, its most
//! recent trades (for the snapshots new subscribers get) and the record of which trade ids reached a
//! socket or were skipped on purpose.

use std::collections::{BTreeMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::Venue;

/// Frames a connection may fall behind its feed before it is dropped as a slow consumer.
const BROADCAST_FRAMES: usize = 16_384;

/// Trades a feed keeps for snapshots: the real venues send up to their last 50 on subscribing.
pub(super) const RECENT_TRADES: usize = 50;

/// A set of trade ids kept as disjoint, non-adjacent inclusive ranges (ids are mostly consecutive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdSet {
    /// Range start to range end (inclusive); no two ranges overlap or touch.
    ranges: BTreeMap<u64, u64>,
}

impl IdSet {
    /// An empty set.
    pub fn new() -> Self {
        IdSet::default()
    }

    /// Adds one id.
    pub fn insert(&mut self, id: u64) {
        self.insert_range(id..=id);
    }

    /// Adds every id in `range`, merging with the ranges it overlaps or touches.
    pub fn insert_range(&mut self, range: RangeInclusive<u64>) {
        let (mut start, mut end) = range.into_inner();
        if start > end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e.saturating_add(1) >= start
        {
            start = s;
            end = end.max(e);
        }
        while let Some((&s, &e)) = self.ranges.range(start..=end.saturating_add(1)).next() {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u64) -> bool {
        self.ranges.range(..=id).next_back().is_some_and(|(_, &end)| id <= end)
    }

    /// How many ids the set holds.
    pub fn len(&self) -> u64 {
        // Saturates only for a set of (nearly) every u64.
        self.ranges.iter().map(|(s, e)| (e - s).saturating_add(1)).fold(0, u64::saturating_add)
    }

    /// Whether the set holds no id.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, ascending; consecutive ranges are separated by at least one missing id.
    pub fn ranges(&self) -> impl Iterator<Item = RangeInclusive<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..=e)
    }
}

impl FromIterator<u64> for IdSet {
    fn from_iter<I: IntoIterator<Item = u64>>(ids: I) -> Self {
        let mut set = IdSet::new();
        ids.into_iter().for_each(|id| set.insert(id));
        set
    }
}

/// One rendered frame of a feed, shared by every subscribed connection.
#[derive(Debug)]
pub(super) struct Frame {
    /// The frame text, rendered once.
    pub text: Utf8Bytes,
    /// The trade ids it carries (consecutive).
    pub ids: RangeInclusive<u64>,
}

/// What the generator, the connections and the handle share about one (venue, symbol).
#[derive(Debug)]
pub(super) struct Feed {
    pub venue: Venue,
    pub symbol: String,
    /// Kraken's channel id for this pair (unused elsewhere).
    pub channel_id: u64,
    /// Every subscribed connection holds a receiver: all see the same trades. Receivers come from
    /// [`Feed::subscribe`] only, which pairs them with the snapshot.
    frames: broadcast::Sender<Arc<Frame>>,
    /// Set once the generator task has been spawned (on the first subscription).
    started: AtomicBool,
    /// Ids the generator must consume without sending.
    pending_skips: AtomicU64,
    /// The last [`RECENT_TRADES`] trades published. Publishing and subscribing both hold this lock,
    /// so a subscriber's snapshot ends exactly where its broadcast receiver starts.
    ring: Mutex<Ring>,
    record: Mutex<Record>,
    /// Whether generated trades are kept in the record.
    pub(super) record_trades: bool,
}

/// A feed's most recent published trades, oldest first (skipped ids are never among them).
#[derive(Debug, Default)]
struct Ring {
    trades: VecDeque<Trade>,
    /// The generator's tick decimals, to render the trades with.
    decimals: u32,
}

/// The trades a feed published before a subscription (at most [`RECENT_TRADES`], oldest first): what
/// the venue's snapshot is made of.
#[derive(Debug, Default)]
pub(super) struct Recent {
    pub trades: Vec<Trade>,
    /// The tick decimals of their prices.
    pub decimals: u32,
}

/// The test-facing record of one feed.
#[derive(Debug, Default)]
pub(super) struct Record {
    /// Ids written to at least one socket.
    sent: IdSet,
    /// Ids consumed by a requested skip and never sent.
    pub(super) skipped: IdSet,
    /// Every trade generated, by id, when the feed keeps them.
    pub(super) trades: std::collections::BTreeMap<u64, SentTrade>,
}

/// A trade as the simulator sent it: what a test needs to compute rollups independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentTrade {
    /// The venue's trade id (Kraken's, which it does not send, is the simulator's own numbering).
    pub id: u64,
    /// Price, e8.
    pub price_e8: i64,
    /// Size, e8.
    pub size_e8: i64,
    /// True when the taker bought.
    pub taker_buys: bool,
    /// Trade time, microseconds since the epoch (venues send milliseconds or finer).
    pub time_us: u64,
}

impl Feed {
    pub fn new(venue: Venue, symbol: String, channel_id: u64, record_trades: bool) -> Self {
        Feed {
            venue,
            symbol,
            channel_id,
            frames: broadcast::channel(BROADCAST_FRAMES).0,
            started: AtomicBool::new(false),
            pending_skips: AtomicU64::new(0),
            ring: Mutex::new(Ring::default()),
            record: Mutex::new(Record::default()),
            record_trades,
        }
    }

    /// True exactly once: for the caller that must spawn the generator.
    pub fn claim_start(&self) -> bool {
        !self.started.swap(true, Ordering::AcqRel)
    }

    pub fn skip(&self, n: u64) {
        self.pending_skips.fetch_add(n, Ordering::AcqRel);
    }

    /// Takes one pending skip, if any. Only the generator calls this.
    pub(super) fn take_skip(&self) -> bool {
        self.pending_skips.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }

    /// Broadcasts one rendered frame of `trades` to every subscriber, keeping the trades for the
    /// snapshots of later subscribers. Only the generator calls this.
    pub(super) fn publish(&self, frame: Frame, trades: &[Trade], decimals: u32) {
        let mut ring = self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for trade in trades {
            if ring.trades.len() == RECENT_TRADES {
                ring.trades.pop_front();
            }
            ring.trades.push_back(trade.clone());
        }
        ring.decimals = decimals;
        // No receivers is fine: trades go on while nobody listens, as on a venue.
        let _ = self.frames.send(Arc::new(frame));
    }

    /// Subscribes to the feed's frames and takes its recent trades in one step, so that every trade
    /// is in exactly one of the two.
    pub(super) fn subscribe(&self) -> (broadcast::Receiver<Arc<Frame>>, Recent) {
        let ring = self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let recent = Recent { trades: ring.trades.iter().cloned().collect(), decimals: ring.decimals };
        (self.frames.subscribe(), recent)
    }

    pub fn record_sent(&self, ids: RangeInclusive<u64>) {
        self.record().sent.insert_range(ids);
    }

    /// Records the trades of a snapshot as sent (their ids need not be consecutive).
    pub(super) fn record_sent_trades(&self, trades: &[Trade]) {
        let mut record = self.record();
        trades.iter().for_each(|t| record.sent.insert(t.id));
    }

    pub fn sent(&self) -> IdSet {
        self.record().sent.clone()
    }

    pub fn sent_trades(&self) -> Vec<SentTrade> {
        let record = self.record();
        record.trades.values().filter(|t| record.sent.contains(t.id)).copied().collect()
    }

    pub fn skipped(&self) -> IdSet {
        self.record().skipped.clone()
    }

    pub(super) fn record(&self) -> MutexGuard<'_, Record> {
        // A poisoned lock only means a panic elsewhere mid-insert; the sets are still usable.
        self.record.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// xorshift64*: small, fast and deterministic; plenty for simulated markets.
#[derive(Clone, Debug)]
pub(super) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(splitmix64(seed).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, to turn a (venue, symbol) into part of a seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// One generated trade, with every venue's fields (each venue renders what it needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Trade {
    /// Binance `a`, Coinbase `trade_id`, OKX `tradeId`, Bybit `i`, Bitstamp `id`, Kraken v2
    /// `trade_id`; Kraken v1's internal sequence number.
    pub id: u64,
    /// Binance `f` and `l`: the underlying trade ids the aggregate covers.
    pub first_trade: u64,
    pub last_trade: u64,
    /// Price in 1e-8 units, on the symbol's tick grid, always > 0.
    pub price_e8: i64,
    /// Quantity in 1e-8 units, > 0.
    pub size_e8: i64,
    /// The taker bought (Binance `m = !taker_buys`, Kraken `b`, Coinbase maker side `sell`).
    pub taker_buys: bool,
    /// A market order (Kraken `m`) rather than a limit order (`l`).
    pub market_order: bool,
    /// Trade time, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Coinbase's feed-wide `sequence` (OKX `seqId`, Coinbase Advanced `sequence_num`).
    pub sequence: u64,
    /// Coinbase's maker and taker order ids (rendered as UUIDs).
    pub maker_order: u128,
    pub taker_order: u128,
}

/// The deterministic part of a feed: prices, sizes and ids for one (venue, symbol).
#[derive(Debug)]
pub(super) struct Generator {
    rng: Rng,
    next_id: u64,
    next_trade: u64,
    sequence: u64,
    /// Price in ticks of `10^-decimals`.
    ticks: i64,
    /// Decimals of the tick size, 2 to 8.
    pub decimals: u32,
}

impl Generator {
    pub fn new(seed: u64, venue: Venue, symbol: &str) -> Self {
        let mut rng = Rng::new(seed ^ fnv1a(venue.name().as_bytes()).rotate_left(17) ^ fnv1a(symbol.as_bytes()));
        let price_e8 = start_price_e8(symbol, &mut rng);
        let decimals = tick_decimals(price_e8);
        let ticks = price_e8 / 10i64.pow(8 - decimals);
        // Kraken v1 has no trade ids: its internal numbering starts at 1.
        let next_id = if venue == Venue::Kraken { 1 } else { 100_000_000 + rng.below(900_000_000) };
        let next_trade = 1_000_000_000 + rng.below(9_000_000_000);
        let sequence = 10_000_000_000 + rng.below(90_000_000_000);
        Generator { rng, next_id, next_trade, sequence, ticks, decimals }
    }

    /// The next trade: consumes one id and moves the price.
    pub fn trade(&mut self, time_us: u64) -> Trade {
        let rng = &mut self.rng;
        // A random walk: mostly a few basis points, sometimes a tick, never below one tick.
        let scale = (self.ticks / 5_000).max(1);
        let step = scale * (rng.below(5) as i64 - 2) + (rng.below(3) as i64 - 1);
        self.ticks = (self.ticks + step).max(1);
        let price_e8 = self.ticks * 10i64.pow(8 - self.decimals);
        // Notional between about 10 and 5000 quote units, as a size in the symbol's base.
        let notional_e8 = (10 + rng.below(5_000)) as i128 * 100_000_000;
        let size_e8 = (notional_e8 * 100_000_000 / i128::from(price_e8)).clamp(1, i128::from(i64::MAX / 2)) as i64;
        let size_e8 = if size_e8 > 1_000 { size_e8 - size_e8 % 1_000 } else { size_e8.max(1) };
        let id = self.next_id;
        self.next_id += 1;
        let first_trade = self.next_trade;
        let last_trade = first_trade + rng.below(3);
        self.next_trade = last_trade + 1;
        self.sequence += 1 + rng.below(8);
        Trade {
            id,
            first_trade,
            last_trade,
            price_e8,
            size_e8,
            taker_buys: rng.chance(50),
            market_order: rng.chance(30),
            time_us,
            sequence: self.sequence,
            maker_order: u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
            taker_order: u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
        }
    }

    /// How many trades the next frame carries: the venues whose frames hold a list of trades
    /// (Kraken v1 and v2, OKX, Bybit, Coinbase Advanced) sometimes batch 2 or 3.
    pub fn burst(&mut self, venue: Venue) -> u64 {
        match venue {
            Venue::Kraken | Venue::KrakenV2 | Venue::Okx | Venue::Bybit | Venue::CoinbaseAdvanced => {
                match self.rng.below(100) {
                    0..60 => 1,
                    60..85 => 2,
                    _ => 3,
                }
            }
            Venue::Binance | Venue::Coinbase | Venue::Bitstamp => 1,
        }
    }
}

/// A plausible starting price for the symbol's base asset.
fn start_price_e8(symbol: &str, rng: &mut Rng) -> i64 {
    const E8: i64 = 100_000_000;
    let upper = symbol.to_ascii_uppercase();
    let known = [("BTC", 60_000), ("XBT", 60_000), ("ETH", 3_000), ("SOL", 150), ("XMR", 160), ("LTC", 80)];
    if let Some((_, price)) = known.iter().find(|(base, _)| upper.starts_with(base)) {
        return price * E8 + rng.below(E8 as u64 * 100) as i64;
    }
    // Otherwise anywhere from 0.001 to 9999: a mantissa in [1, 10) times 10^-3..=10^3.
    let mantissa_e8 = E8 + rng.below(9 * E8 as u64) as i64;
    match rng.below(7) as i64 - 3 {
        e @ 0.. => mantissa_e8 * 10i64.pow(e as u32),
        e => mantissa_e8 / 10i64.pow(e.unsigned_abs() as u32),
    }
}

/// Decimals of the tick size: fewer for expensive assets, 2 to 8.
fn tick_decimals(price_e8: i64) -> u32 {
    let units = price_e8 / 100_000_000;
    match units {
        1_000.. => 2,
        100.. => 3,
        10.. => 4,
        1.. => 5,
        _ if price_e8 >= 10_000_000 => 6,
        _ if price_e8 >= 1_000_000 => 7,
        _ => 8,
    }
}

/// Microseconds since the Unix epoch, from the real clock.
pub(super) fn now_us() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_set_merges_ranges() {
        let mut set = IdSet::new();
        // The last range is empty.
        for r in [5..=7, 10..=10, 1..=2, 8..=9, 20..=25, 3..=3, 22..=30, RangeInclusive::new(40, 39)] {
            set.insert_range(r);
        }
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![1..=3, 5..=10, 20..=30]);
        assert_eq!(set.len(), 3 + 6 + 11);
        assert!(set.contains(5) && set.contains(30) && !set.contains(4) && !set.contains(31));
        set.insert(4);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![1..=10, 20..=30]);
        assert_eq!(set, (1..=10).chain(20..=30).rev().collect::<IdSet>());
        set.insert_range(0..=u64::MAX);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![0..=u64::MAX]);
        assert_eq!(set.len(), u64::MAX);
    }

    #[test]
    fn generators_are_deterministic_and_prices_stay_positive_on_the_tick_grid() {
        for (venue, symbol) in [(Venue::Binance, "BTCUSDT"), (Venue::Coinbase, "SHIB-USD"), (Venue::Kraken, "XBT/USD")]
        {
            for seed in 0..20 {
                let mut a = Generator::new(seed, venue, symbol);
                let mut b = Generator::new(seed, venue, symbol);
                assert!((2..=8).contains(&a.decimals));
                let grid = 10i64.pow(8 - a.decimals);
                let mut previous: Option<Trade> = None;
                for _ in 0..20_000 {
                    let t = a.trade(1);
                    assert_eq!(t, b.trade(1));
                    assert!(t.price_e8 > 0 && t.price_e8 % grid == 0, "{t:?}");
                    assert!(t.size_e8 > 0, "{t:?}");
                    assert!(t.first_trade <= t.last_trade);
                    if let Some(p) = previous {
                        assert_eq!(t.id, p.id + 1);
                        assert_eq!(t.first_trade, p.last_trade + 1);
                        assert!(t.sequence > p.sequence);
                    }
                    previous = Some(t);
                }
            }
        }
        // Different seeds, different markets.
        assert_ne!(
            Generator::new(1, Venue::Binance, "BTCUSDT").trade(0),
            Generator::new(2, Venue::Binance, "BTCUSDT").trade(0)
        );
    }

    #[test]
    fn tick_decimals_shrink_as_prices_grow() {
        let e8 = 100_000_000;
        let cases = [(60_000 * e8, 2), (354 * e8, 3), (42 * e8, 4), (e8, 5), (e8 / 5, 6), (e8 / 50, 7), (1_305, 8)];
        for (price, decimals) in cases {
            assert_eq!(tick_decimals(price), decimals, "{price}");
        }
    }
}
