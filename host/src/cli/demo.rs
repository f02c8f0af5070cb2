//! `sluice demo` and `sluice bench`: the whole pipeline on embedded defaults, fed by the simulator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::config::{Config, SourceConfig};
use crate::pipeline::{Role, start};
use crate::sink::embedded::QueryConnection;
use feedsim::{FeedSim, FeedSimConfig, Venue};

/// Arguments of `sluice demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds; without it the demo runs until Ctrl-C.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Simulated trades per second per symbol.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Where the local log, the store and the plugins are kept [default: ./sluice-data, or the
    /// configuration's `data_dir` with --config].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where the HTTP API listens [default: 127.0.0.1:8080, or the configuration's `[api] bind`].
    #[arg(long)]
    pub api_addr: Option<std::net::SocketAddr>,
    /// Where the demo's feed simulator listens; the sources connect there (port 0: any free port,
    /// not with --print-config).
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub feed_addr: std::net::SocketAddr,
    /// The simulated venues to run, comma-separated: binance, coinbase, kraken, okx, bybit,
    /// bitstamp, kraken-v2, coinbase-advanced.
    #[arg(long, value_delimiter = ',', default_value = "binance,coinbase,kraken", value_parser = parse_venue, conflicts_with = "config")]
    pub venues: Vec<Venue>,
    /// Print the demo's configuration (a complete `sluice` configuration file) and exit:
    /// `sluice demo --config FILE` runs the same demo from it.
    #[arg(long)]
    pub print_config: bool,
    /// Run the demo from this configuration file (as `--print-config` writes it, edited at will):
    /// the demo still starts its feed simulator, at the address its sources' `ws://` URLs name.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// A venue by its name, or an error listing the names there are.
fn parse_venue(s: &str) -> Result<Venue, String> {
    Venue::from_name(s.trim()).ok_or_else(|| {
        let known: Vec<&str> = Venue::ALL.iter().map(|v| v.name()).collect();
        format!("unknown venue {s:?} (known: {})", known.join(", "))
    })
}

/// The symbols the demo subscribes to on `venue`, spelled as the venue spells them.
fn demo_symbols(venue: Venue) -> &'static [&'static str] {
    match venue {
        Venue::Binance => &["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        Venue::Coinbase => &["BTC-USD", "ETH-USD"],
        Venue::Kraken => &["XBT/USD", "ETH/USD"],
        Venue::Okx => &["BTC-USDT", "ETH-USDT", "SOL-USDT"],
        Venue::Bybit => &["BTCUSDT", "ETHUSDT", "SOLUSDT"],
        Venue::Bitstamp => &["btcusd", "ethusd"],
        Venue::KrakenV2 => &["BTC/USD", "ETH/USD"],
        Venue::CoinbaseAdvanced => &["BTC-USD", "ETH-USD", "SOL-USD"],
    }
}

/// Arguments of `sluice bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Simulated feeds (venue and symbol pairs), spread over Binance, Coinbase and Kraken in turn.
    #[arg(long, default_value_t = 7)]
    pub feeds: usize,
    /// Trades per second offered, in total over all feeds.
    #[arg(long, default_value_t = 100_000.0)]
    pub rate: f64,
    /// How long to offer them.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Seconds at the start left out of the totals and percentiles (connections, plugins warming up).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Where the local log and the store go (a fresh temporary directory by default).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Hand records over through this Kafka cluster instead of the local log (topics named for
    /// this run are created).
    #[arg(long)]
    pub brokers: Option<String>,
    /// With --brokers, deliver to the Druid topic in Kafka transactions instead of the embedded
    /// store (no Overlord is needed: the spec is generated, its POST fails and is retried).
    #[arg(long, requires = "brokers")]
    pub druid: bool,
    /// With --druid, the transactions the Druid sink keeps in flight
    /// (`[sink.druid] transactions_in_flight`).
    #[arg(long, requires = "druid")]
    pub transactions_in_flight: Option<u32>,
    /// With --brokers, a librdkafka property for sluice's Kafka clients (`[kafka] options`), as
    /// `key=value`; repeatable. To try fetch and linger settings against a cluster.
    #[arg(long = "kafka-option", requires = "brokers", value_parser = parse_option)]
    pub kafka_options: Vec<(String, String)>,
    /// With --brokers, the replicas of each partition of the topics this run creates
    /// (`[kafka] replication_factor`; `min_insync_replicas` is 2 when it is 2 or more): 1 for the
    /// single-broker clusters a load test usually runs against.
    #[arg(long, default_value_t = 1, requires = "brokers")]
    pub replication_factor: i16,
    /// The local log's `synchronous` setting (`[local_log] synchronous`), to measure what durability costs.
    #[arg(long, value_enum)]
    pub synchronous: Option<crate::handoff::Synchronous>,
    /// The one transform every source's records go through: `rescale` (stateless, passes them
    /// all) or, say, `outlier-filter` (keeps its last price per symbol as committed state).
    #[arg(long, default_value = "rescale")]
    pub transform: String,
    /// Run the feed simulator in a process of its own (`sluice feedsim`), so the CPU reported is
    /// sluice's alone; the simulator's is reported beside it.
    #[arg(long)]
    pub apart: bool,
}

/// A `key=value` pair.
fn parse_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// The feed simulator of a bench: in this process, or `sluice feedsim` in a child process.
enum Simulator {
    Here(FeedSim),
    Apart { child: tokio::process::Child, addr: String },
}

impl Simulator {
    /// Starts one at `per_feed` trades/s per subscribed symbol.
    async fn start(apart: bool, per_feed: f64) -> anyhow::Result<Self> {
        if !apart {
            let config = FeedSimConfig { trades_per_second: per_feed, ..FeedSimConfig::default() };
            return Ok(Simulator::Here(FeedSim::start(config).await?));
        }
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe().context("cannot find this program to start the simulator")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["feedsim", "--bind", "127.0.0.1:0", "--rate", &per_feed.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `sluice feedsim`")?;
        let stdout = child.stdout.take().context("the simulator's output")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        // Its first line names the Binance endpoint: `binance: ws://ADDR/binance`.
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the simulator did not say where it listens within 10 s")??
            .context("the simulator ended before saying where it listens")?;
        let addr = first
            .split("ws://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .with_context(|| format!("unexpected first line from the simulator: {first:?}"))?
            .to_owned();
        // The rest of its output is read and dropped, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Simulator::Apart { child, addr })
    }

    fn url(&self, venue: Venue) -> String {
        match self {
            Simulator::Here(sim) => sim.url(venue),
            Simulator::Apart { addr, .. } => format!("ws://{addr}/{}", venue.name()),
        }
    }

    /// The simulator's CPU time so far, when it runs apart.
    fn cpu(&self) -> Option<Duration> {
        match self {
            Simulator::Here(_) => None,
            Simulator::Apart { child, .. } => child.id().map(|pid| usage_of(&format!("/proc/{pid}")).0),
        }
    }

    async fn stop(self) {
        match self {
            Simulator::Here(sim) => _ = sim.shutdown().await,
            Simulator::Apart { mut child, .. } => {
                if let Some(pid) = child.id() {
                    // SIGINT, as Ctrl-C: it stops its connections and prints its counts.
                    let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// The demo's API token: `SLUICE_API_TOKEN` if set, else a fresh random one (printed at start).
fn demo_token() -> crate::api::Secret {
    use std::hash::{BuildHasher, Hasher};
    crate::api::Secret::from_env().unwrap_or_else(|| {
        // Each RandomState is seeded from the operating system's randomness.
        let part = || std::collections::hash_map::RandomState::new().build_hasher().finish();
        crate::api::Secret(format!("{:016x}{:016x}", part(), part()))
    })
}

/// One source per venue, named after it, subscribed to `symbols` on the simulator in the venue's own
/// subscribe message, decoded by the bundled plugin of the same name, and kept alive the way the
/// venue asks (OKX wants a text `ping` at least every 30 s, Bybit `{"op":"ping"}` every 20 s, ...).
fn venue_sources(sim: &dyn Fn(Venue) -> String, venues: &[(Venue, &[&str])]) -> Vec<SourceConfig> {
    let list = |items: Vec<String>| items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(",");
    venues
        .iter()
        .filter(|(_, symbols)| !symbols.is_empty())
        .map(|(venue, symbols)| {
            let symbols: Vec<String> = symbols.iter().map(|s| s.to_string()).collect();
            let name = venue.to_string();
            let mut s = SourceConfig::new(&name, &sim(*venue), &name);
            let keepalive = |s: &mut SourceConfig, text: &str, every_ms: u64| {
                s.keepalive_text = Some(text.into());
                s.ping_interval_ms = every_ms;
            };
            let subscribe = match venue {
                Venue::Binance => vec![format!(
                    r#"{{"method":"SUBSCRIBE","params":[{}],"id":1}}"#,
                    list(symbols.iter().map(|s| format!("{}@aggTrade", s.to_lowercase())).collect())
                )],
                Venue::Coinbase => {
                    vec![format!(r#"{{"type":"subscribe","product_ids":[{}],"channels":["matches"]}}"#, list(symbols))]
                }
                Venue::Kraken => vec![format!(
                    r#"{{"event":"subscribe","pair":[{}],"subscription":{{"name":"trade"}}}}"#,
                    list(symbols)
                )],
                Venue::Okx => {
                    keepalive(&mut s, "ping", 20_000);
                    // "The connection will soon be closed for a service upgrade."
                    s.shutdown_notices.push(r#""64008""#.into());
                    let args = symbols.iter().map(|s| format!(r#"{{"channel":"trades","instId":{s:?}}}"#));
                    vec![format!(r#"{{"op":"subscribe","args":[{}]}}"#, args.collect::<Vec<_>>().join(","))]
                }
                Venue::Bybit => {
                    keepalive(&mut s, r#"{"op":"ping"}"#, 20_000);
                    let topics = symbols.iter().map(|s| format!("publicTrade.{s}")).collect();
                    vec![format!(r#"{{"op":"subscribe","args":[{}]}}"#, list(topics))]
                }
                Venue::Bitstamp => {
                    keepalive(&mut s, r#"{"event":"bts:heartbeat"}"#, 20_000);
                    s.shutdown_notices.push("bts:request_reconnect".into());
                    // One channel per subscribe message.
                    symbols
                        .iter()
                        .map(|pair| format!(r#"{{"event":"bts:subscribe","data":{{"channel":"live_trades_{pair}"}}}}"#))
                        .collect()
                }
                Venue::KrakenV2 => {
                    keepalive(&mut s, r#"{"method":"ping"}"#, 20_000);
                    vec![format!(
                        r#"{{"method":"subscribe","params":{{"channel":"trade","symbol":[{}]}}}}"#,
                        list(symbols)
                    )]
                }
                Venue::CoinbaseAdvanced => {
                    // One channel per subscribe message; heartbeats keep quiet subscriptions open.
                    let products = list(symbols);
                    ["market_trades", "heartbeats"]
                        .iter()
                        .map(|channel| {
                            format!(r#"{{"type":"subscribe","product_ids":[{products}],"channel":"{channel}"}}"#)
                        })
                        .collect()
                }
            };
            s.subscribe = subscribe;
            s
        })
        .collect()
}

/// The demo's Binance chain: `min-volume` (trades under 0.001 dropped), then `outlier-filter`.
pub fn demo_chain() -> Vec<crate::config::Link> {
    let mut min_volume = crate::config::Link::new("min-volume");
    min_volume.config.insert("min_volume".into(), "0.001".into());
    vec![min_volume, crate::config::Link::new("outlier-filter")]
}

/// The configuration `sluice demo` runs without `--config`: one source per venue on the simulator at
/// `sim` (see [`venue_sources`]), the Binance chain of [`demo_chain`], the local log and the store
/// under `--data-dir`, the API on `--api-addr`.
pub fn demo_config(args: &DemoArgs, sim: std::net::SocketAddr) -> Config {
    let mut venues: Vec<(Venue, &[&str])> = Vec::new();
    for venue in &args.venues {
        if !venues.iter().any(|(v, _)| v == venue) {
            venues.push((*venue, demo_symbols(*venue)));
        }
    }
    let mut config = Config {
        data_dir: args.data_dir.clone().unwrap_or_else(|| PathBuf::from("./sluice-data")),
        api: crate::api::ApiConfig {
            bind: args.api_addr.unwrap_or_else(|| ([127, 0, 0, 1], 8080).into()),
            ..crate::api::ApiConfig::default()
        },
        sources: venue_sources(&|v| format!("ws://{sim}/{}", v.name()), &venues),
        ..Config::default()
    };
    // The Binance feed's rules as a chain: dust trades dropped, then bad prints refused.
    for source in config.sources.iter_mut().filter(|s| s.name == "binance") {
        source.transforms = Some(demo_chain());
    }
    config
}

/// The demo's configuration as a file: a comment on how to run it, then every field.
///
/// # Errors
/// When the feed address is port 0 (a file must name the port the simulator will listen on).
pub fn print_config(config: &Config, sim: std::net::SocketAddr) -> anyhow::Result<String> {
    if sim.port() == 0 {
        bail!("--print-config needs a fixed --feed-addr (port 0 is any free port, which a file cannot name)");
    }
    Ok(format!(
        "# The configuration of `sluice demo`. `sluice demo --config THIS_FILE` runs the same demo from it\n\
         # (starting the feed simulator at {sim}, the address its sources name); `sluice run --config\n\
         # THIS_FILE` runs it with `sluice feedsim --bind {sim}` started beside it.\n\n{}",
        toml::to_string_pretty(config)?
    ))
}

/// The configuration `sluice demo --config FILE` runs: the file, with `--data-dir` and `--api-addr`
/// over it when given, and where the simulator must listen: the one address of every source whose
/// URL is `ws://ADDR/<venue>` (`None` when no source reads the simulator).
///
/// # Errors
/// A file that does not load, or sources naming the simulator at two addresses.
pub fn file_config(args: &DemoArgs, path: &std::path::Path) -> anyhow::Result<(Config, Option<std::net::SocketAddr>)> {
    let mut config = Config::load(path).map_err(anyhow::Error::msg)?;
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(addr) = args.api_addr {
        config.api.bind = addr;
    }
    let mut sim: Option<std::net::SocketAddr> = None;
    for source in &config.sources {
        let Some(rest) = source.url.strip_prefix("ws://") else { continue };
        let Some((addr, path)) = rest.split_once('/') else { continue };
        let (Ok(addr), Some(_)) = (addr.parse::<std::net::SocketAddr>(), Venue::from_name(path)) else { continue };
        match sim {
            Some(known) if known != addr => {
                bail!("source {:?} reads the simulator at {addr}, another at {known}: the demo runs one", source.name)
            }
            _ => sim = Some(addr),
        }
    }
    Ok((config, sim))
}

/// `sluice demo`: simulator → sources → wasm decode → local log → transforms → store, with counts as it runs.
pub(super) async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let (config, sim_addr) = match &args.config {
        Some(path) => file_config(&args, path)?,
        None => (demo_config(&args, args.feed_addr), Some(args.feed_addr)),
    };
    if args.print_config {
        print!("{}", print_config(&config, sim_addr.unwrap_or(args.feed_addr))?);
        return Ok(());
    }
    let sim = match sim_addr {
        Some(bind) => Some(
            FeedSim::start(FeedSimConfig {
                bind,
                trades_per_second: args.rate,
                seed: feedsim::fresh_seed(),
                ..FeedSimConfig::default()
            })
            .await
            .with_context(|| format!("cannot start the feed simulator at {bind} (--feed-addr)"))?,
        ),
        None => None,
    };
    let mut config = config;
    // Port 0 asked for any free port: the sources read the one the simulator got.
    if let Some(sim) = sim.as_ref().filter(|s| sim_addr != Some(s.addr())) {
        let (asked, got) = (format!("ws://{}/", sim_addr.unwrap_or(args.feed_addr)), format!("ws://{}/", sim.addr()));
        for source in &mut config.sources {
            if source.url.starts_with(&asked) {
                source.url = source.url.replacen(&asked, &got, 1);
            }
        }
    }
    config.api.token = Some(demo_token());
    let venues: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
    let running = start(&config, Role::All).await?;
    println!(
        "sluice demo: {} simulated venues ({}) -> wasm decoders -> {} -> transforms -> the embedded store",
        venues.len(),
        venues.join(", "),
        running.handoff
    );
    println!(
        "HTTP API at http://{0}: the page at /, /health/ready, /v1/plugins, \
         /v1/query?sql=SELECT%20*%20FROM%20rollup%20LIMIT%205",
        running.api_addr
    );
    if let Some(token) = &config.api.token {
        println!(
            "plugin uploads: curl -X PUT -H 'Authorization: Bearer {}' --data-binary @plugin.wasm http://{}/v1/plugins/<name>",
            token.0, running.api_addr
        );
        println!(
            "into a chain:   curl -X POST -H 'Authorization: Bearer {}' -d '{{\"plugin\": \"<name>\", \"at\": 0}}' \
             http://{}/v1/sources/<source>/chain/links",
            token.0, running.api_addr
        );
    }
    match args.seconds {
        Some(n) => println!("running for {n} s (Ctrl-C stops earlier)"),
        None => println!("running until Ctrl-C"),
    }
    println!(
        "{:>5}  {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>9}",
        "s", "frames", "dropped", "records", "delivered", "rejects", "rule-rej", "gaps", "up", "stored"
    );
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut second = 0u64;
    while args.seconds.is_none_or(|n| second < n) {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        second += 1;
        let [frames, dropped, records, delivered, rejects, gaps, up] = running.counts();
        let (stored, refused) = (running.stored(), running.transform_rejects());
        println!(
            "{second:>5}  {frames:>9} {dropped:>7} {records:>9} {delivered:>9} {rejects:>9} {refused:>9} {gaps:>7} {up:>3}/{n} {stored:>9}",
            n = venues.len()
        );
    }
    let store_path = running.store_path.clone().context("no embedded store")?;
    let handoff = running.handoff.to_string();
    let delivered = running.stop().await?;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    println!("stopped: {delivered} records delivered to {handoff}");
    if delivered == 0 {
        if args.rate > 0.0 {
            bail!("no records were delivered");
        }
        return Ok(());
    }
    let sql = "SELECT strftime('%H:%M', bucket_ms / 1000, 'unixepoch') AS minute, source, symbol, side, events, \
               round(qty_sum, 4) AS qty, price_min, price_max, price_last \
               FROM rollup ORDER BY bucket_ms DESC, source, symbol, side LIMIT 12";
    println!("\nrolled up in {} (per minute, source, symbol, side):\n{sql}", store_path.display());
    let rows = QueryConnection::open(&store_path)?.query(sql, 12)?;
    if rows.is_empty() {
        bail!("nothing was rolled up");
    }
    for row in rows {
        let cells: Vec<String> = row.values().map(|v| v.to_string()).collect();
        println!("  {}", cells.join("  "));
    }
    Ok(())
}

/// CPU time (user and system) this process has used, and its resident memory, from `/proc/self`.
fn own_usage() -> (Duration, u64) {
    usage_of("/proc/self")
}

/// The CPU time and resident memory of the process whose `/proc` directory is `proc`.
fn usage_of(proc: &str) -> (Duration, u64) {
    let cpu = std::fs::read_to_string(format!("{proc}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which may hold spaces: utime and stime are the 12th and
            // 13th, in clock ticks (USER_HZ, 100 on Linux).
            let rest = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .map_or(Duration::ZERO, |ticks| Duration::from_millis(ticks * 10));
    let rss = std::fs::read_to_string(format!("{proc}/statm"))
        .ok()
        .and_then(|statm| statm.split(' ').nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    (cpu, rss)
}

/// One line of the load tool's report.
struct BenchLine<'a> {
    label: &'a str,
    offered: f64,
    achieved: f64,
    dropped: u64,
    gaps: u64,
    committed: u64,
    latency: &'a hdrhistogram::Histogram<u64>,
    cpu: f64,
    rss: u64,
    /// The simulator's CPU (cores) when it runs apart.
    sim_cpu: Option<f64>,
}

impl std::fmt::Display for BenchLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |q: f64| {
            if self.latency.is_empty() { f64::NAN } else { self.latency.value_at_quantile(q) as f64 / 1000.0 }
        };
        let max = if self.latency.is_empty() { f64::NAN } else { self.latency.max() as f64 / 1000.0 };
        write!(
            f,
            "{:>5} {:>9.0} {:>9.0} {:>8} {:>8} {:>10} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>5.0} {:>6} {:>5} {:>7.2}",
            self.label,
            self.offered,
            self.achieved,
            self.dropped,
            self.gaps,
            self.committed,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            max,
            self.cpu * 100.0,
            self.rss >> 20,
            self.sim_cpu.map_or("-".to_owned(), |c| format!("{:.0}", c * 100.0)),
            // Microseconds of CPU per trade committed: sluice's alone when the simulator runs apart.
            if self.achieved > 0.0 { self.cpu * 1e6 / self.achieved } else { f64::NAN }
        )
    }
}

/// `sluice bench`: the load tool (see [`Command::Bench`]).
pub(super) async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.feeds == 0 || args.rate <= 0.0 || args.seconds <= args.warmup {
        bail!("--feeds and --rate must be positive and --seconds longer than --warmup");
    }
    let per_feed = args.rate / args.feeds as f64;
    let sim = Simulator::start(args.apart, per_feed).await?;
    let names: Vec<(Venue, String)> = (0..args.feeds)
        .map(|i| match i % 3 {
            0 => (Venue::Binance, format!("S{i}USDT")),
            1 => (Venue::Coinbase, format!("S{i}-USD")),
            _ => (Venue::Kraken, format!("S{i}/USD")),
        })
        .collect();
    let of = |venue: Venue| names.iter().filter(|(v, _)| *v == venue).map(|(_, s)| s.as_str()).collect::<Vec<_>>();
    let (binance, coinbase, kraken) = (of(Venue::Binance), of(Venue::Coinbase), of(Venue::Kraken));
    let temp = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temp.clone());
    let mut config = Config {
        data_dir: data_dir.clone(),
        api: crate::api::ApiConfig { bind: ([127, 0, 0, 1], 0).into(), ..crate::api::ApiConfig::default() },
        sources: venue_sources(
            &|v| sim.url(v),
            &[(Venue::Binance, &binance), (Venue::Coinbase, &coinbase), (Venue::Kraken, &kraken)],
        ),
        ..Config::default()
    };
    if let Some(synchronous) = args.synchronous {
        config.local_log.synchronous = synchronous;
    }
    // Every source's records through one wasm transform call per batch (rescale passes them all).
    config.process.transforms = vec![crate::config::Link::new(&args.transform)];
    if let Some(brokers) = &args.brokers {
        let run = format!("sluice.bench.{}", std::process::id());
        config.kafka.brokers = brokers.clone();
        config.kafka.events_topic = format!("{run}.events");
        config.kafka.dlq_topic = format!("{run}.dlq");
        config.kafka.symbols_topic = format!("{run}.symbols");
        config.kafka.replication_factor = args.replication_factor;
        config.kafka.min_insync_replicas = args.replication_factor.min(2);
        config.kafka.options.extend(args.kafka_options.iter().cloned());
        config.kafka.validate().map_err(anyhow::Error::msg)?;
        config.process.group = run.clone();
        config.process.instance = Some("bench".into());
        if args.druid {
            config.sink.druid = Some(crate::sink::druid::DruidSinkConfig {
                overlord_url: "http://127.0.0.1:9".into(),
                topic: format!("{run}.druid"),
                transactions_in_flight: args
                    .transactions_in_flight
                    .unwrap_or(crate::sink::druid::DruidSinkConfig::default().transactions_in_flight),
                ..crate::sink::druid::DruidSinkConfig::default()
            });
        }
    }
    let running = start(&config, Role::All).await?;
    let stats = running.process.as_ref().context("no process role")?.stats.clone();
    let sink = if args.druid { "the Druid topic" } else { "the embedded store" };
    let where_sim = if args.apart {
        "the simulator runs in a process of its own: cpu% is sluice's alone, sim% the simulator's"
    } else {
        "the simulator runs in this process; cpu% counts it"
    };
    println!(
        "sluice bench: {} feeds at {:.0} trades/s in total for {} s through {} into {sink} ({where_sim})",
        args.feeds, args.rate, args.seconds, running.handoff
    );
    println!(
        "{:>5} {:>9} {:>9} {:>8} {:>8} {:>10} {:>7} {:>7} {:>7} {:>7} {:>5} {:>6} {:>5} {:>7}",
        "s",
        "offered/s",
        "achieved",
        "dropped",
        "gaps",
        "committed",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "cpu%",
        "rss MB",
        "sim%",
        "µs/trade"
    );
    let mut total = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let _ = stats.receive_to_commit.take();
    let _ = stats.sink_commit.take();
    let mut commits = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2)?;
    let (mut last_cpu, _) = own_usage();
    let mut last_sim = sim.cpu();
    let mut window_sim = Duration::ZERO;
    let mut last_committed = running.stored();
    let (mut window_cpu, mut window_start_committed) = (Duration::ZERO, 0);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut measured = 0u64;
    for second in 1..=args.seconds {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let latency = stats.receive_to_commit.take();
        let (cpu, rss) = own_usage();
        let [_, dropped, _, _, _, gaps, _] = running.counts();
        let committed = running.stored();
        if second == args.warmup {
            window_start_committed = committed;
        }
        let committing = stats.sink_commit.take();
        let sim_now = sim.cpu();
        let sim_cpu = sim_now.zip(last_sim).map(|(now, last)| now.saturating_sub(last));
        if second > args.warmup {
            total.add(&latency)?;
            commits.add(&committing)?;
            window_cpu += cpu.saturating_sub(last_cpu);
            window_sim += sim_cpu.unwrap_or_default();
            measured += 1;
        }
        let line = BenchLine {
            label: &second.to_string(),
            offered: args.rate,
            achieved: committed.saturating_sub(last_committed) as f64,
            dropped,
            gaps,
            committed,
            latency: &latency,
            cpu: cpu.saturating_sub(last_cpu).as_secs_f64(),
            rss,
            sim_cpu: sim_cpu.map(|d| d.as_secs_f64()),
        };
        println!("{line}");
        (last_cpu, last_committed, last_sim) = (cpu, committed, sim_now);
    }
    let [_, dropped, _, _, _, gaps, _] = running.counts();
    let committed = running.stored();
    let (_, rss) = own_usage();
    let seconds = measured.max(1) as f64;
    let line = BenchLine {
        label: "all",
        offered: args.rate,
        achieved: committed.saturating_sub(window_start_committed) as f64 / seconds,
        dropped,
        gaps,
        committed,
        latency: &total,
        cpu: window_cpu.as_secs_f64() / seconds,
        rss,
        sim_cpu: args.apart.then(|| window_sim.as_secs_f64() / seconds),
    };
    println!("{line}");
    println!("(\"all\": the {measured} s after the warm-up; latency is receive to commit, per row)");
    if !commits.is_empty() {
        let ms = |v: u64| v as f64 / 1000.0;
        println!(
            "sink commits: {} ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms",
            commits.len(),
            commits.len() as f64 / seconds,
            ms(commits.value_at_quantile(0.5)),
            ms(commits.value_at_quantile(0.99)),
            ms(commits.max()),
            commits.mean() / 1000.0
        );
    }
    running.stop().await?;
    sim.stop().await;
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    if dropped > 0 || gaps > 0 {
        bail!("{dropped} frames were dropped and {gaps} trade ids are missing");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{DemoArgs, demo_config, file_config, print_config};

    fn args(extra: &[&str]) -> DemoArgs {
        match crate::cli::Cli::try_parse_from(["sluice", "demo"].iter().chain(extra)).unwrap().command {
            crate::cli::Command::Demo(args) => args,
            other => panic!("not the demo: {other:?}"),
        }
    }

    /// The printed file, loaded as `sluice demo --config` loads it, is the very configuration the
    /// demo runs without it: every venue, the Binance chain, the data directory and the API address.
    #[test]
    fn the_printed_configuration_is_the_demos() {
        let dir = std::env::temp_dir().join(format!("sluice-demo-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for extra in [
            &[][..],
            &["--venues", "binance,coinbase,kraken,okx,bybit,bitstamp,kraken-v2,coinbase-advanced"],
            &["--feed-addr", "127.0.0.1:9555", "--api-addr", "127.0.0.1:9556", "--data-dir", "/tmp/d"],
        ] {
            let args = args(extra);
            let demo = demo_config(&args, args.feed_addr);
            let file = dir.join("demo.toml");
            std::fs::write(&file, print_config(&demo, args.feed_addr).unwrap()).unwrap();
            let (loaded, sim) = file_config(&self::args(&[]), &file).unwrap();
            assert_eq!(loaded, demo, "{extra:?}");
            assert_eq!(sim, Some(args.feed_addr), "the simulator where the sources look for it");
            assert!(loaded.sources.iter().any(|s| s.transforms.as_ref().is_some_and(|t| t.len() == 2)));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
