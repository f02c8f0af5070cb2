//! `sluice demo`: the whole pipeline on embedded defaults, fed by the simulator; and the venue sources
//! `sluice bench` reads the simulator through.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::config::{Config, SourceConfig};
use crate::pipeline::{Role, Running, start};
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
pub(super) fn venue_sources(sim: &dyn Fn(Venue) -> String, venues: &[(Venue, &[&str])]) -> Vec<SourceConfig> {
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
    let (mut config, sim_addr) = match &args.config {
        Some(path) => file_config(&args, path)?,
        None => (demo_config(&args, args.feed_addr), Some(args.feed_addr)),
    };
    if args.print_config {
        print!("{}", print_config(&config, sim_addr.unwrap_or(args.feed_addr))?);
        return Ok(());
    }
    let sim = match sim_addr {
        Some(bind) => Some(start_simulator(bind, args.rate).await?),
        None => None,
    };
    if let (Some(sim), Some(asked)) = (&sim, sim_addr) {
        read_simulator_at(&mut config, asked, sim.addr());
    }
    config.api.token = Some(demo_token());
    let running = start(&config, Role::All).await?;
    print_banner(&config, &running, args.seconds);
    print_counts(&running, args.seconds, config.sources.len()).await;
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
    print_rollup(&store_path)
}

/// The demo's feed simulator, listening at `bind` and sending `rate` trades/s per symbol.
///
/// # Errors
/// When it cannot listen there.
async fn start_simulator(bind: std::net::SocketAddr, rate: f64) -> anyhow::Result<FeedSim> {
    FeedSim::start(FeedSimConfig {
        bind,
        trades_per_second: rate,
        seed: feedsim::fresh_seed(),
        ..FeedSimConfig::default()
    })
    .await
    .with_context(|| format!("cannot start the feed simulator at {bind} (--feed-addr)"))
}

/// Points the sources that read the simulator at `asked` to where it listens, `got`: they differ when
/// port 0 asked for any free port.
fn read_simulator_at(config: &mut Config, asked: std::net::SocketAddr, got: std::net::SocketAddr) {
    if asked == got {
        return;
    }
    let (asked, got) = (format!("ws://{asked}/"), format!("ws://{got}/"));
    for source in &mut config.sources {
        if source.url.starts_with(&asked) {
            source.url = source.url.replacen(&asked, &got, 1);
        }
    }
}

/// What runs, where the API is, how to add a plugin, for how long, and the heads of the counts'
/// columns.
fn print_banner(config: &Config, running: &Running, seconds: Option<u64>) {
    let venues: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
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
    match seconds {
        Some(n) => println!("running for {n} s (Ctrl-C stops earlier)"),
        None => println!("running until Ctrl-C"),
    }
    println!(
        "{:>5}  {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>9}",
        "s", "frames", "dropped", "records", "delivered", "rejects", "rule-rej", "gaps", "up", "stored"
    );
}

/// A line of counts a second, for `seconds` or until Ctrl-C; `sources` is how many could be up.
async fn print_counts(running: &Running, seconds: Option<u64>, sources: usize) {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut second = 0u64;
    while seconds.is_none_or(|n| second < n) {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        second += 1;
        let [frames, dropped, records, delivered, rejects, gaps, up] = running.counts();
        let (stored, refused) = (running.stored(), running.transform_rejects());
        println!(
            "{second:>5}  {frames:>9} {dropped:>7} {records:>9} {delivered:>9} {rejects:>9} {refused:>9} {gaps:>7} {up:>3}/{sources} {stored:>9}"
        );
    }
}

/// The latest rows of the store's per-minute rollup, and the query that reads them.
///
/// # Errors
/// A store that cannot be read, or one with nothing rolled up.
fn print_rollup(store_path: &std::path::Path) -> anyhow::Result<()> {
    let sql = "SELECT strftime('%H:%M', bucket_ms / 1000, 'unixepoch') AS minute, source, symbol, side, events, \
               round(qty_sum, 4) AS qty, price_min, price_max, price_last \
               FROM rollup ORDER BY bucket_ms DESC, source, symbol, side LIMIT 12";
    println!("\nrolled up in {} (per minute, source, symbol, side):\n{sql}", store_path.display());
    let rows = QueryConnection::open(store_path)?.query(sql, 12)?;
    if rows.is_empty() {
        bail!("nothing was rolled up");
    }
    for row in rows {
        let cells: Vec<String> = row.values().map(|v| v.to_string()).collect();
        println!("  {}", cells.join("  "));
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
