//! The command line: `sluice plugin test`, `sluice demo` and `sluice feedsim`.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use plugin_sdk::wire::{Delimited, StreamDataView, push_delimited};
use serde::Serialize;

use crate::api::{ApiState, Health};
use crate::config::{Config, SourceConfig};
use crate::feedsim::{FeedSim, FeedSimConfig, Venue};
use crate::log::kafka::consumer::EventConsumer;
use crate::log::kafka::producer::{EventProducer, ProducerStats};
use crate::log::kafka::{ensure_symbols_topic, ensure_topics};
use crate::log::local::{LocalLog, POSITION_TOPIC};
use crate::log::{LogStatus, PartitionStatus, Reader, Writer};
use crate::pipeline::{
    Breakers, Ingest, IngestSettings, Names, ProcessError, ProcessSettings, ProcessStats, run_process,
};
use crate::plugin::registry::{Binding, BoundPlugin, Registry, Slot};
use crate::plugin::{Limits, PluginCode, PluginInstance, Runtime, RuntimeSettings, bundled};
use crate::sink::Sink;
use crate::sink::druid::{DruidSink, transactional_id};
use crate::sink::embedded::{EmbeddedStore, QueryConnection};
use crate::symbols::Symbols;
use crate::transform::Transformer;

/// sluice: WebSocket market data to Kafka, through sandboxed wasm plugins, to Druid.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// The whole pipeline on embedded defaults until Ctrl-C: the feed simulator, the bundled plugins,
    /// the local log and the embedded store, with counts printed every second.
    Demo(DemoArgs),
    /// Serve simulated venue feeds on loopback until Ctrl-C.
    Feedsim(FeedsimArgs),
    /// The load tool: N simulated feeds at R trades/s for T seconds through the whole pipeline on
    /// embedded defaults, with throughput, drops, gaps, receive-to-commit latency, CPU and memory
    /// every second and at the end. Exits non-zero when anything was dropped or missing.
    Bench(BenchArgs),
    /// Run the roles (ingest, process or both) from a configuration file until Ctrl-C or SIGTERM.
    Run(RunArgs),
    /// Check a configuration file and print the effective configuration, defaults filled in.
    CheckConfig(CheckConfigArgs),
}

/// Arguments of `sluice run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// The roles to play; `ingest` and `process` apart need `[kafka] brokers`.
    #[arg(long, value_enum, default_value = "all")]
    pub role: Role,
    /// Where the HTTP API listens, overriding `[api] bind`.
    #[arg(long)]
    pub api_addr: Option<std::net::SocketAddr>,
}

/// Arguments of `sluice check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    pub config: PathBuf,
}

/// Arguments of `sluice demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds; without it the demo runs until Ctrl-C.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Simulated trades per second per symbol.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Where the local log, the store and the plugins are kept.
    #[arg(long, default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api_addr: std::net::SocketAddr,
    /// The simulated venues to run, comma-separated: binance, coinbase, kraken, okx, bybit,
    /// bitstamp, kraken-v2, coinbase-advanced.
    #[arg(long, value_delimiter = ',', default_value = "binance,coinbase,kraken", value_parser = parse_venue)]
    pub venues: Vec<Venue>,
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
}

/// Arguments of `sluice feedsim`.
#[derive(Debug, Args)]
pub struct FeedsimArgs {
    /// Address to serve on (`/binance`, `/coinbase`, `/kraken`).
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub bind: std::net::SocketAddr,
    /// Trades per second per subscribed symbol.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
}

/// `sluice plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin on recorded frames: records as JSON lines on stdout, rejects on stderr.
    Test(PluginTestArgs),
    /// Write a new plugin crate (source, native tests, sample frames and their expected output).
    New(PluginNewArgs),
}

/// Arguments of `sluice plugin new`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["decode", "transform"])))]
pub struct PluginNewArgs {
    /// The crate's name (a-z, 0-9, '-').
    pub name: String,
    /// A decoder: venue frames to records.
    #[arg(long)]
    pub decode: bool,
    /// A transform: records to records.
    #[arg(long)]
    pub transform: bool,
    /// Where to write it [default: plugins/<name> in a sluice checkout, else ./<name>].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The plugin-sdk crate to depend on [default: the checkout's plugin-sdk/, found from here up].
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

/// `sluice plugin new`: writes the crate and says what to run next.
///
/// # Errors
/// As [`crate::scaffold::new_plugin`], or no SDK found without `--sdk`.
pub fn plugin_new(args: &PluginNewArgs, out: &mut impl Write) -> anyhow::Result<PathBuf> {
    let here = std::env::current_dir()?;
    let checkout = here.ancestors().find(|d| d.join("plugin-sdk/Cargo.toml").is_file() && d.join("plugins").is_dir());
    let sdk = match (&args.sdk, checkout) {
        (Some(sdk), _) => sdk.clone(),
        (None, Some(root)) => root.join("plugin-sdk"),
        (None, None) => anyhow::bail!(
            "no sluice checkout here or above: pass --sdk <path to plugin-sdk> (an unpacked `cargo package -p plugin-sdk`)"
        ),
    };
    let dir = match (&args.dir, checkout) {
        (Some(dir), _) => dir.clone(),
        (None, Some(root)) => root.join("plugins").join(&args.name),
        (None, None) => here.join(&args.name),
    };
    let kind = if args.decode { crate::scaffold::Kind::Decode } else { crate::scaffold::Kind::Transform };
    let dir = crate::scaffold::new_plugin(&args.name, kind, &dir, &sdk)?;
    writeln!(
        out,
        "wrote {} ({}); next: cd there, `cargo test`, then see its README.md",
        dir.display(),
        crate::scaffold::FILES.join(", ")
    )?;
    Ok(dir)
}

/// Arguments of `sluice plugin test`.
#[derive(Debug, Args)]
pub struct PluginTestArgs {
    /// The plugin component (`.wasm`, built for wasm32-wasip2); omit it with `--source`.
    #[arg(required_unless_present_any = ["source", "decode_with"])]
    pub plugin: Option<PathBuf>,
    /// Run this source's whole chain as the configuration file given with `--from` names it: its
    /// `decode` plugin with its `decode_config`, then each of its transforms (or the `[process]`
    /// default chain) with their configs; plugins come from `[plugins]` paths or are bundled.
    #[arg(long, value_name = "NAME", requires = "from", conflicts_with_all = ["plugin", "decode_with", "then", "config", "decoder_config"])]
    pub source: Option<String>,
    /// The configuration file `--source` is read from.
    #[arg(long, value_name = "sluice.toml", requires = "source")]
    pub from: Option<PathBuf>,
    /// A file with one raw WebSocket frame per line.
    #[arg(long)]
    pub frames: PathBuf,
    /// A config entry for the plugin's `init`, as key=value; repeat for several.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Decode the frames with this plugin instead (for plugins that only transform).
    #[arg(long, value_name = "DECODER.wasm")]
    pub decode_with: Option<PathBuf>,
    /// Config entries for the decoder given with --decode-with.
    #[arg(long = "decoder-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub decoder_config: Vec<(String, String)>,
    /// The source id to stamp on decoded records, as the host does for a configured source.
    #[arg(long, default_value_t = 0)]
    pub source_id: u32,
    /// Per-call deadline in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub deadline_ms: u64,
    /// After the plugin, transform with this one too, in order (repeat for a chain); its config
    /// follows the path after commas: `--then filter.wasm,min_volume=0.5`.
    #[arg(long, value_name = "PLUGIN.wasm[,KEY=VALUE...]", value_parser = parse_link)]
    pub then: Vec<(PathBuf, Vec<(String, String)>)>,
    /// Compare the records with this file (JSON lines, as this command prints them); the first
    /// difference is reported and the run fails.
    #[arg(long, value_name = "EXPECTED.jsonl")]
    pub expect: Option<PathBuf>,
    /// Fail (exit status 3) when any frame gave no record and was not refused either: a decoder
    /// that silently ignores a venue's frames (a warning is printed without this flag too).
    #[arg(long)]
    pub strict: bool,
}

/// Exit status of `sluice plugin test --strict` when frames gave no records.
pub const EXIT_FRAMES_WITHOUT_RECORDS: u8 = 3;

/// An error that asks the binary for a particular exit status.
#[derive(Debug)]
pub struct ExitWith {
    /// The exit status.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitWith {}

fn parse_link(s: &str) -> Result<(PathBuf, Vec<(String, String)>), String> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("expected PLUGIN.wasm[,KEY=VALUE...]")?;
    let config = parts.map(parse_key_value).collect::<Result<Vec<_>, _>>()?;
    Ok((PathBuf::from(path), config))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Runs the command line.
///
/// # Errors
/// Anything that keeps the command from running, with a message for the user.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plugin(PluginCommand::New(args)) => {
            plugin_new(&args, &mut io::stdout())?;
            Ok(())
        }
        Command::Plugin(PluginCommand::Test(args)) => {
            let stdout = io::stdout();
            let stderr = io::stderr();
            plugin_test(&args, &mut io::BufWriter::new(stdout.lock()), &mut stderr.lock())?;
            Ok(())
        }
        Command::Demo(args) => runtime()?.block_on(demo(args)),
        Command::Bench(args) => runtime()?.block_on(bench(args)),
        Command::Run(args) => {
            let mut config = Config::load(&args.config).map_err(anyhow::Error::msg)?;
            if let Some(addr) = args.api_addr {
                config.api.bind = addr;
            }
            config.api.token = crate::api::Secret::from_env();
            runtime()?.block_on(serve(config, args.role))
        }
        Command::CheckConfig(args) => {
            let config = Config::load(&args.config).map_err(anyhow::Error::msg)?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Feedsim(args) => runtime()?.block_on(async {
            let config = FeedSimConfig { bind: args.bind, trades_per_second: args.rate, ..FeedSimConfig::default() };
            let sim = FeedSim::start(config).await?;
            for venue in Venue::ALL {
                println!("{venue}: {}", sim.url(venue));
            }
            tokio::signal::ctrl_c().await?;
            let stats = sim.shutdown().await;
            println!("served {} connections, {} frames", stats.connections_accepted, stats.frames_sent);
            Ok(())
        }),
    }
}

/// One output record as `sluice plugin test` prints it.
#[derive(Debug, Serialize)]
struct RecordLine<'a> {
    source_id: u32,
    symbol: Option<&'a str>,
    symbol_id: u32,
    price_e8: i64,
    volume_e8: i64,
    timestamp_ms: i64,
    is_buy: bool,
    trade_id: u64,
}

/// One reject as `sluice plugin test` prints it: a frame (1-based line) or a record (0-based index).
#[derive(Debug, Serialize)]
struct RejectLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    frame: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    /// The `--then` link that refused it (absent for the decoder and the first transform).
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<&'a str>,
    reason: &'a str,
}

/// Counts from a `plugin test` run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestSummary {
    /// Frames read from the file.
    pub frames: usize,
    /// Records printed.
    pub records: usize,
    /// Rejects printed (frames and records).
    pub rejects: usize,
    /// Frames that gave no record and were not refused.
    pub empty_frames: usize,
}

/// The last line `sluice plugin test` writes to stderr.
#[derive(Debug, Serialize)]
struct SummaryLine {
    summary: SummaryCounts,
}

#[derive(Debug, Serialize)]
struct SummaryCounts {
    frames: usize,
    records: usize,
    rejects: usize,
    frames_without_records: usize,
    ms: u64,
}

/// Frames per `decode` call and records per `transform` call.
const FRAMES_PER_CALL: usize = 256;
const RECORDS_PER_CALL: usize = 1024;

/// `sluice plugin test`: decode every line of the frames file, transform all records, print them.
///
/// # Errors
/// When the plugin or the frames file cannot be read, the plugin cannot be loaded or is not a sluice
/// plugin, or a call traps or hits a limit.
pub fn plugin_test(args: &PluginTestArgs, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<TestSummary> {
    let started = std::time::Instant::now();
    let expected = match &args.expect {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read expected output {}", path.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let mut printed: Vec<String> = Vec::new();
    let source = match (&args.source, &args.from) {
        (Some(name), Some(path)) => {
            let config = Config::load(path).map_err(anyhow::Error::msg)?;
            let source = config
                .sources
                .iter()
                .find(|s| &s.name == name)
                .with_context(|| format!("{} has no source named {name:?}", path.display()))?
                .clone();
            Some((config, source))
        }
        _ => None,
    };
    // The plugin, the decoder and each link, with room for each to be replaced once.
    let links = source.as_ref().map_or(args.then.len(), |(c, s)| c.chain(s).len());
    let runtime = Runtime::new(
        RuntimeSettings { max_instances: 4 + 2 * links as u32, ..RuntimeSettings::default() },
        Arc::new(Symbols::new()),
    )?;
    let limits = Limits { deadline: std::time::Duration::from_millis(args.deadline_ms), ..Limits::default() };
    let start = |name: &str, wasm: &[u8], config: &[(String, String)]| -> anyhow::Result<PluginInstance> {
        let code: Arc<PluginCode> =
            runtime.compile(name, wasm, limits).with_context(|| format!("cannot load plugin {name}"))?;
        code.instantiate(config).with_context(|| format!("cannot start plugin {name}"))
    };
    let load = |path: &Path, config: &[(String, String)]| -> anyhow::Result<PluginInstance> {
        let wasm = std::fs::read(path).with_context(|| format!("cannot read plugin {}", path.display()))?;
        start(&path.display().to_string(), &wasm, config)
    };
    // (the decoding plugin, whether it transforms too, an extra decoder, the links after it)
    let (mut plugin, plugin_transforms, mut decoder, mut thens, names) = match &source {
        Some((config, s)) => {
            let decoder = start(&s.decode, &plugin_bytes(config, &s.decode)?, &s.decode_pairs())?;
            let chain = config.chain(s);
            let links = chain
                .iter()
                .map(|l| start(&l.plugin, &plugin_bytes(config, &l.plugin)?, &l.config_pairs()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            (decoder, false, None, links, chain.iter().map(|l| l.plugin.clone()).collect::<Vec<_>>())
        }
        None => {
            let thens =
                args.then.iter().map(|(path, config)| load(path, config)).collect::<anyhow::Result<Vec<_>>>()?;
            let names = args.then.iter().map(|(p, _)| p.display().to_string()).collect();
            match (&args.plugin, &args.decode_with) {
                (Some(path), decode_with) => {
                    let decoder = match decode_with {
                        Some(path) => Some(load(path, &args.decoder_config)?),
                        None => None,
                    };
                    (load(path, &args.config)?, true, decoder, thens, names)
                }
                // `--decode-with A --then B --then C`: the chain is the links alone.
                (None, Some(path)) => (load(path, &args.decoder_config)?, false, None, thens, names),
                (None, None) => bail!("a plugin, --decode-with, or --source with --from, is needed"),
            }
        }
    };
    let file =
        std::fs::File::open(&args.frames).with_context(|| format!("cannot read frames {}", args.frames.display()))?;
    let mut lines = Vec::new();
    for (i, line) in io::BufReader::new(file).split(b'\n').enumerate() {
        let mut line = line.with_context(|| format!("cannot read frames {}", args.frames.display()))?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if !line.is_empty() {
            lines.push((i + 1, line));
        }
    }
    let symbols = runtime.symbols().clone();
    let mut summary = TestSummary { frames: lines.len(), ..TestSummary::default() };
    let decoding = decoder.as_mut().unwrap_or(&mut plugin);

    // Decode: frames in batches; stamp the source id as the host does.
    let mut records = plugin_sdk::Records::new();
    let mut frames = Vec::new();
    for chunk in lines.chunks(FRAMES_PER_CALL) {
        frames.clear();
        for (_, line) in chunk {
            push_delimited(&mut frames, line);
        }
        let first = chunk.first().map_or(0, |(n, _)| *n);
        let last = chunk.last().map_or(0, |(n, _)| *n);
        let decoded = decoding.decode(&frames).with_context(|| format!("decoding frames on lines {first}..={last}"))?;
        for reject in &decoded.rejects {
            let line = chunk.get(reject.index as usize).map(|(n, _)| *n);
            write_json(err, &RejectLine { frame: line, index: None, link: None, reason: &reject.reason })?;
            summary.rejects += 1;
        }
        let refused = |i: usize| decoded.rejects.iter().any(|r| r.index as usize == i);
        summary.empty_frames +=
            decoded.counts.iter().enumerate().filter(|&(i, &count)| count == 0 && !refused(i)).count();
        for item in Delimited::new(&decoded.records) {
            // The runtime validated every record before returning them.
            let view = item.and_then(StreamDataView::parse).context("decoded record")?;
            let mut record = view.record();
            record.source_id = args.source_id;
            records.push(&record);
        }
    }

    // Transform: all decoded records through the plugin, then through each `--then` link in order.
    if plugin_transforms {
        records = transform_all(&mut plugin, records.as_bytes(), None, err, &mut summary)?;
    }
    for (link, name) in thens.iter_mut().zip(&names) {
        records = transform_all(link, records.as_bytes(), Some(name), err, &mut summary)?;
    }
    for item in Delimited::new(records.as_bytes()) {
        let r = item.and_then(StreamDataView::parse).context("transformed record")?;
        let name = symbols.name(r.symbol_id);
        let line = serde_json::to_string(&RecordLine {
            source_id: r.source_id,
            symbol: name.as_deref(),
            symbol_id: r.symbol_id,
            price_e8: r.price_e8,
            volume_e8: r.volume_e8,
            timestamp_ms: r.timestamp_ms,
            is_buy: r.is_buy,
            trade_id: r.trade_id,
        })?;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        if expected.is_some() {
            printed.push(line);
        }
        summary.records += 1;
    }
    out.flush()?;
    let counts = SummaryCounts {
        frames: summary.frames,
        records: summary.records,
        rejects: summary.rejects,
        frames_without_records: summary.empty_frames,
        ms: started.elapsed().as_millis() as u64,
    };
    write_json(err, &SummaryLine { summary: counts })?;
    err.flush()?;
    if let (Some(expected), Some(path)) = (&expected, &args.expect)
        && let Some(i) = (0..expected.len().max(printed.len())).find(|&i| expected.get(i) != printed.get(i))
    {
        let show = |l: Option<&String>| l.map_or_else(|| "nothing (the output ends here)".to_owned(), Clone::clone);
        anyhow::bail!(
            "output differs from {} at record {} (line {}):\n  expected: {}\n  got:      {}",
            path.display(),
            i,
            i + 1,
            show(expected.get(i)),
            show(printed.get(i))
        );
    }
    if summary.empty_frames > 0 {
        let message = format!(
            "{} of {} frames gave no record and were not refused: is this the decoder for these frames?",
            summary.empty_frames, summary.frames
        );
        if args.strict {
            return Err(ExitWith { code: EXIT_FRAMES_WITHOUT_RECORDS, message }.into());
        }
        writeln!(err, "warning: {message}")?;
    }
    Ok(summary)
}

/// One link of the chain over all `records`, in batches: rejects to `err` (naming the link when it
/// is a `--then`), and the output records, each checked to be valid `StreamData`.
fn transform_all(
    plugin: &mut PluginInstance,
    records: &[u8],
    link: Option<&str>,
    err: &mut impl Write,
    summary: &mut TestSummary,
) -> anyhow::Result<plugin_sdk::Records> {
    let mut output = plugin_sdk::Records::new();
    let mut batch = Vec::new();
    let mut index = 0usize;
    let mut items = Delimited::new(records).peekable();
    let at = |what: String| match link {
        Some(l) => format!("{l}: {what}"),
        None => what,
    };
    while items.peek().is_some() {
        batch.clear();
        let mut n = 0;
        for item in items.by_ref().take(RECORDS_PER_CALL) {
            push_delimited(&mut batch, item.context("record")?);
            n += 1;
        }
        let done =
            plugin.transform(&batch).with_context(|| at(format!("transforming records {index}..{}", index + n - 1)))?;
        for reject in &done.rejects {
            let line =
                RejectLine { frame: None, index: Some(index + reject.index as usize), link, reason: &reject.reason };
            write_json(err, &line)?;
            summary.rejects += 1;
        }
        // The runtime checked the framing; the records' contents are checked here, all of the call's
        // before any is kept.
        for (i, item) in Delimited::new(&done.records).enumerate() {
            let view = item.and_then(StreamDataView::parse).map_err(|e| {
                anyhow::anyhow!(
                    "{}",
                    at(format!(
                        "transforming records {index}..{}: {}",
                        index + n - 1,
                        crate::plugin::PluginError::InvalidOutput(format!("output record {i}: {e}"))
                    ))
                )
            })?;
            output.push_view(&view);
        }
        index += n;
    }
    Ok(output)
}

fn write_json(w: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *w, value)?;
    w.write_all(b"\n")?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// Which roles `sluice run` plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Both roles in one process (the default).
    All,
    /// Sources to Kafka only.
    Ingest,
    /// Kafka through the plugins to the sink only.
    Process,
}

/// The hand-off between the roles: a Kafka cluster, or the local log in the data directory.
#[derive(Clone)]
enum Handoff {
    /// Bootstrap servers.
    Kafka(String),
    /// The local log, open.
    Local(LocalLog),
}

impl std::fmt::Display for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handoff::Kafka(brokers) => write!(f, "Kafka at {brokers}"),
            Handoff::Local(log) => write!(f, "the local log {}", log.path().display()),
        }
    }
}

/// The roles, running.
struct Running {
    ingest: Option<Ingest>,
    producer: Arc<Writer>,
    process: Option<ProcessRole>,
    handoff: Handoff,
    /// Where the HTTP API listens.
    api_addr: std::net::SocketAddr,
    /// Stops the API server and the health checks.
    api_stop: tokio::sync::watch::Sender<bool>,
    api_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The process role's thread, its stop flag and counters.
struct ProcessRole {
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<ProcessStats>,
    /// The embedded store, when that is the sink.
    store_path: Option<PathBuf>,
}

/// Opens the plugin registry under the data directory and deploys the plugins the sources use in
/// `role` (decoders for ingest, the links of their chains for process; the configured file or the
/// bundled plugin; a version already stored stays on the version the API last
/// activated). Compiles off the async runtime.
async fn open_plugins(
    config: &Config,
    role: Role,
    symbols: Arc<Symbols>,
    metrics: Arc<crate::telemetry::Metrics>,
) -> anyhow::Result<(Arc<Registry>, HashMap<String, Arc<Slot>>)> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let runtime = Arc::new(Runtime::new(RuntimeSettings::default(), symbols)?.with_metrics(metrics));
        let limits = config.plugins.iter().map(|(name, p)| (name.clone(), Limits::from(p))).collect();
        // What this instance runs: each source's decoder in the ingest role, each link of its chain
        // in the process role; an upload is checked against every configuration it is bound with.
        let mut bindings: HashMap<String, Vec<Binding>> = HashMap::new();
        for s in &config.sources {
            if role != Role::Process {
                bindings
                    .entry(s.decode.clone())
                    .or_default()
                    .push(Binding { source: s.name.clone(), config: s.decode_pairs() });
            }
            if role != Role::Ingest {
                for link in config.chain(s) {
                    bindings
                        .entry(link.plugin.clone())
                        .or_default()
                        .push(Binding { source: s.name.clone(), config: link.config_pairs() });
                }
            }
        }
        let mut wanted: Vec<String> = bindings.keys().cloned().collect();
        wanted.sort_unstable();
        let registry = Arc::new(Registry::open(runtime, &config.data_dir.join("plugins"), limits, bindings)?);
        let mut slots = HashMap::new();
        for name in &wanted {
            let name = name.as_str();
            let wasm = plugin_bytes(&config, name)?;
            let slot = registry.deploy(name, &wasm).with_context(|| format!("plugin {name}"))?;
            slots.insert(name.to_owned(), slot);
        }
        Ok((registry, slots))
    })
    .await?
}

/// The component of plugin `name`: the file `[plugins.<name>] path` names, or the bundled one.
fn plugin_bytes(config: &Config, name: &str) -> anyhow::Result<Vec<u8>> {
    match config.plugins.get(name).and_then(|p| p.path.as_ref()) {
        Some(path) => std::fs::read(path).with_context(|| format!("plugin {name}: cannot read {}", path.display())),
        None => Ok(bundled::by_name(name)
            .with_context(|| format!("plugin {name} is not bundled and has no path"))?
            .to_vec()),
    }
}

/// Starts the roles asked for: the broker (embedded unless configured), the topics, the shared symbol
/// dictionary, the plugins, the sources (ingest), and the consumer that transforms each source's
/// records with its plugin and delivers them to the sink (process).
async fn start(config: &Config, role: Role) -> anyhow::Result<Running> {
    // The API comes up first, so an operator can watch readiness while the rest starts.
    let health = Arc::new(Health::new());
    health.expect(if config.kafka.brokers.trim().is_empty() { "log" } else { "kafka" });
    health.expect("plugins");
    if role != Role::Ingest {
        health.expect("sink");
        health.expect("breakers");
    }
    let store_path =
        (role != Role::Ingest && config.sink.druid.is_none()).then(|| config.data_dir.join("store.sqlite"));
    let listener = tokio::net::TcpListener::bind(config.api.bind)
        .await
        .with_context(|| format!("cannot listen on {} for the HTTP API ([api] bind)", config.api.bind))?;
    let api_addr = listener.local_addr()?;
    let (api_stop, _) = tokio::sync::watch::channel(false);
    let directory = Arc::new(crate::api::SourceDirectory::default());
    let plugin_api = Arc::new(crate::api::PluginDirectory::default());
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let api_state = ApiState::new(&config.api, store_path.clone(), health.clone())
        .with_sources(directory.clone())
        .with_plugins(plugin_api.clone())
        .with_metrics(metrics.clone());
    let router = crate::api::router(api_state.clone());
    let mut api_stopped = api_stop.subscribe();
    let api_task = tokio::spawn(crate::api::serve(listener, router, async move {
        let _ = api_stopped.wait_for(|s| *s).await;
    }));
    tracing::info!(addr = %api_addr, "HTTP API listening");

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let kafka = &config.kafka;
    let (handoff, symbols, producer) = if kafka.brokers.trim().is_empty() {
        if role != Role::All {
            bail!("running one role on its own needs [kafka] brokers, which the other role shares");
        }
        let (handoff, symbols, producer) = open_local_log(config, store_path.as_deref()).await?;
        health.set("log", true, format!("local log at {}", config.data_dir.join("log.sqlite").display()));
        (handoff, symbols, producer)
    } else {
        let brokers = kafka.brokers.clone();
        ensure_topics(kafka, &brokers, &[&kafka.events_topic, &kafka.dlq_topic], kafka.partitions).await?;
        ensure_symbols_topic(kafka, &brokers).await?;
        if let Some(druid) = &config.sink.druid {
            ensure_topics(kafka, &brokers, &[&druid.topic], kafka.partitions).await?;
        }
        let (k, b) = (kafka.clone(), brokers.clone());
        let symbols = Arc::new(
            tokio::task::spawn_blocking(move || Symbols::shared(&k, &b, &k.symbols_topic, Duration::from_secs(30)))
                .await?
                .context("symbol dictionary")?,
        );
        let producer = Arc::new(Writer::Kafka(EventProducer::new(kafka, &brokers)?));
        tokio::spawn(watch_kafka(producer.clone(), health.clone(), api_stop.subscribe()));
        (Handoff::Kafka(brokers), symbols, producer)
    };
    api_state.set_log(log_probe(config, &handoff, store_path.clone())?);
    // Source ids, stable per name (kept in the symbol dictionary): records in the log keep meaning
    // the same source across restarts and config edits.
    let source_ids: Vec<u32> = {
        let (dictionary, names) = (symbols.clone(), config.sources.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
        tokio::task::spawn_blocking(move || {
            names.iter().map(|n| dictionary.source_id(n)).collect::<Result<Vec<_>, _>>()
        })
        .await?
        .context("source ids")?
    };
    let (registry, plugins) = open_plugins(config, role, symbols.clone(), metrics.clone()).await?;
    plugin_api.set(registry);
    let mut names: Vec<&str> = plugins.keys().map(String::as_str).collect();
    names.sort_unstable();
    health.set("plugins", true, format!("loaded: {}", names.join(", ")));
    let producer_stats = producer.stats().clone();
    metrics.on_scrape(move |m| m.mirror_producer(&producer_stats.sample()));
    if let Handoff::Local(log) = &handoff {
        let log = log.clone();
        metrics.on_scrape(move |m| {
            let s = log.status();
            m.mirror_log(s.start, s.end, s.committed, log.bytes(), log.dropped());
        });
    }
    let ingest = if role != Role::Process {
        let settings = IngestSettings::from(&config.ingest);
        let ingest = Ingest::start_with_ids(config.sources.clone(), &source_ids, &plugins, producer.clone(), settings)?;
        directory.set(
            ingest
                .sources()
                .iter()
                .map(|h| crate::api::SourceEntry {
                    name: h.config.name.clone(),
                    plugin: h.config.decode.clone(),
                    slot: plugins[&h.config.decode].clone(),
                    transforms: config
                        .chain(&h.config)
                        .iter()
                        .map(|l| (l.plugin.clone(), plugins.get(&l.plugin).cloned()))
                        .collect(),
                    stats: h.stats.clone(),
                    decode: h.decode.clone(),
                    running: h.running.clone(),
                })
                .collect(),
        );
        let sources: Vec<_> =
            ingest.sources().iter().map(|h| (h.config.name.clone(), h.stats.clone(), h.decode.clone())).collect();
        metrics.on_scrape(move |m| {
            let now_us = crate::clock::now_us();
            for (name, stats, decode) in &sources {
                m.mirror_source(name, &decode.sample(stats), now_us);
            }
        });
        Some(ingest)
    } else {
        None
    };
    if let (Some(druid), true, Handoff::Kafka(brokers)) = (&config.sink.druid, role != Role::Ingest, &handoff) {
        // A spec that does not pass the offline checks stops the start; it is never posted.
        crate::sink::druid::supervisor_spec(druid, crate::proto::DESCRIPTOR_SET, brokers)
            .context("[sink.druid] does not make a valid supervisor spec")?;
        health.expect("druid");
        tokio::spawn(keep_druid_supervisor(
            druid.clone(),
            brokers.clone(),
            health.clone(),
            metrics.clone(),
            api_stop.subscribe(),
        ));
    }
    let process = if role != Role::Ingest {
        let process =
            start_process(config, &source_ids, &handoff, &plugins, symbols, health, metrics.clone(), store_path)
                .await?;
        let stats = process.stats.clone();
        metrics.on_scrape(move |m| m.mirror_process(&stats.sample()));
        Some(process)
    } else {
        None
    };
    Ok(Running { ingest, producer, process, handoff, api_addr, api_stop, api_task })
}

/// Opens the local log in the data directory, checks the store's position against it (a store
/// ahead of its log stops the start), and opens the symbol dictionary and the appender on it.
async fn open_local_log(config: &Config, store: Option<&Path>) -> anyhow::Result<(Handoff, Arc<Symbols>, Arc<Writer>)> {
    let (path, log_config, store) = (config.data_dir.join("log.sqlite"), config.log.clone(), store.map(Path::to_owned));
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let log = LocalLog::open(&path, &log_config)?;
        if let Some(store) = store {
            let offsets = EmbeddedStore::open(&store, Duration::from_secs(60))?.offsets(POSITION_TOPIC)?;
            log.check_position(offsets.iter().find(|o| o.1 == 0).map(|o| o.2))?;
        }
        let symbols = Arc::new(Symbols::local(log.path()).context("symbol dictionary")?);
        let writer = Arc::new(Writer::Local(log.writer(Arc::new(ProducerStats::default()))?));
        Ok((Handoff::Local(log), symbols, writer))
    })
    .await?
}

/// What `GET /v1/log` reads: the local log's own positions, or each partition's watermarks and the
/// sink's committed offsets (the store's, or the consumer group's for Druid) on Kafka.
fn log_probe(config: &Config, handoff: &Handoff, store: Option<PathBuf>) -> anyhow::Result<crate::api::LogProbe> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let brokers = match handoff {
        Handoff::Local(log) => {
            let log = log.clone();
            return Ok(Arc::new(move || Ok(LogStatus { mode: "local", partitions: vec![log.status()] })));
        }
        Handoff::Kafka(brokers) => brokers,
    };
    let mut c = config.kafka.client_config(brokers);
    c.set("group.id", &config.process.group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().context("a Kafka client for /v1/log")?;
    let topic = config.kafka.events_topic.clone();
    Ok(Arc::new(move || {
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).map_err(|e| e.to_string())?;
        let count = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        let committed: HashMap<i32, i64> = match &store {
            Some(path) if path.exists() => crate::sink::embedded::stored_offsets(path, &topic)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(_, p, o)| (p, o))
                .collect(),
            Some(_) => HashMap::new(),
            None => {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for p in 0..count {
                    tpl.add_partition(&topic, p);
                }
                let got = consumer.committed_offsets(tpl, timeout).map_err(|e| e.to_string())?;
                got.elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
                    .collect()
            }
        };
        let mut partitions = Vec::new();
        for p in 0..count {
            let (start, end) = consumer.fetch_watermarks(&topic, p, timeout).map_err(|e| e.to_string())?;
            let committed = committed.get(&p).copied().unwrap_or(start);
            partitions.push(PartitionStatus { partition: p, start, end, committed, lag: (end - committed).max(0) });
        }
        Ok(LogStatus { mode: "kafka", partitions })
    }))
}

/// Applies the Druid supervisor spec through the Overlord (again after failures) and then polls the
/// supervisor's status and health, for `/health/ready`.
async fn keep_druid_supervisor(
    druid: crate::sink::druid::DruidSinkConfig,
    brokers: String,
    health: Arc<Health>,
    metrics: Arc<crate::telemetry::Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match crate::sink::druid::OverlordClient::from_config(&druid) {
        Ok(client) => client,
        Err(e) => {
            health.set("druid", false, format!("{e}"));
            return;
        }
    };
    let mut id = None;
    loop {
        let pause = match &id {
            None => match client.apply(&druid, crate::proto::DESCRIPTOR_SET, &brokers).await {
                Ok(applied) => {
                    tracing::info!(supervisor = %applied, "Druid supervisor spec applied");
                    health.set("druid", false, "spec applied; waiting for the supervisor's first status");
                    id = Some(applied);
                    Duration::ZERO
                }
                Err(e) => {
                    metrics.druid_overlord_errors_total.inc();
                    tracing::warn!(error = %e, "applying the Druid supervisor spec failed; will retry");
                    health.set("druid", false, format!("applying the supervisor spec: {e}"));
                    if e.is_retriable() { Duration::from_secs(5) } else { Duration::from_secs(60) }
                }
            },
            Some(supervisor) => {
                let polled = client.poll_once(supervisor).await;
                metrics.druid_supervisor_healthy.set(i64::from(polled.as_ref().is_ok_and(|p| p.healthy)));
                match &polled {
                    Ok(poll) => metrics.druid_supervisor_lag_messages.set(poll.status.aggregate_lag.unwrap_or(0)),
                    Err(_) => metrics.druid_overlord_errors_total.inc(),
                }
                match polled {
                    Ok(poll) => {
                        health.set("druid", poll.healthy, format!("supervisor {supervisor}: {}", poll.status.state))
                    }
                    Err(e) => health.set("druid", false, format!("supervisor {supervisor}: {e}")),
                }
                druid.poll_interval()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Checks every few seconds that the Kafka cluster answers, for `/health/ready`.
async fn watch_kafka(producer: Arc<Writer>, health: Arc<Health>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let p = producer.clone();
        let reachable = move || match &*p {
            Writer::Kafka(p) => p.reachable(Duration::from_secs(5)),
            Writer::Local(_) => Ok(0),
        };
        match tokio::task::spawn_blocking(reachable).await {
            Ok(Ok(brokers)) => health.set("kafka", true, format!("{brokers} broker(s) answering")),
            Ok(Err(e)) => health.set("kafka", false, e),
            Err(e) => health.set("kafka", false, e.to_string()),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The process role on its own thread: each source's records through its plugin's transform, into
/// the configured sink. A failure (say, an aborted transaction) restarts the role from the last
/// committed offsets after a pause.
#[allow(clippy::too_many_arguments)]
async fn start_process(
    config: &Config,
    source_ids: &[u32],
    handoff: &Handoff,
    plugins: &HashMap<String, Arc<Slot>>,
    symbols: Arc<Symbols>,
    health: Arc<Health>,
    metrics: Arc<crate::telemetry::Metrics>,
    store_path: Option<PathBuf>,
) -> anyhow::Result<ProcessRole> {
    // Source ids as the ingest role stamps them (stable per name, from the dictionary).
    let mut transformers = HashMap::new();
    for (&id, source) in source_ids.iter().zip(&config.sources) {
        let mut chain = Vec::new();
        for link in config.chain(source) {
            let slot = plugins.get(&link.plugin).with_context(|| format!("plugin {} is not loaded", link.plugin))?;
            let instance = slot
                .active()
                .instantiate(&link.config_pairs())
                .with_context(|| format!("source {}: plugin {}", source.name, link.plugin))?;
            chain.push(Transformer::bound(BoundPlugin::new(slot.clone(), instance)));
        }
        transformers.insert(id, chain);
    }
    // `sources[id - 1]` names source `id`; ids no configured source has are holes (their records are
    // dead-lettered: no plugin is bound to them).
    let mut sources: Vec<Arc<str>> = vec![Arc::from(""); source_ids.iter().copied().max().unwrap_or(0) as usize];
    for (&id, source) in source_ids.iter().zip(&config.sources) {
        sources[id as usize - 1] = Arc::from(source.name.as_str());
    }
    let names = Names { sources, symbols };
    health.set("breakers", true, "all closed");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats = Arc::new(ProcessStats::default());
    let settings = ProcessSettings {
        partitions: config.kafka.partitions,
        batch: crate::batch::BatchConfig::from(&config.process),
        health: Some(health),
        metrics: Some(metrics),
        ..ProcessSettings::default()
    };
    let (config, handoff, path) = (config.clone(), handoff.clone(), store_path.clone());
    let (stop_flag, counters) = (stop.clone(), stats.clone());
    let thread = std::thread::Builder::new().name("sluice-process".into()).spawn(move || -> anyhow::Result<()> {
        let mut pause = Duration::from_millis(200);
        let mut breakers = Breakers::default();
        loop {
            let result = (|| -> anyhow::Result<()> {
                let consumer = match &handoff {
                    Handoff::Kafka(brokers) => Reader::Kafka(EventConsumer::new(
                        &config.kafka,
                        brokers,
                        &config.process.group,
                        Some(&config.process.instance),
                    )?),
                    Handoff::Local(log) => Reader::Local(log.reader()?, log.clone()),
                };
                let mut sink: Box<dyn Sink> = match (&config.sink.druid, &path, &handoff) {
                    (Some(druid), _, Handoff::Kafka(brokers)) => Box::new(DruidSink::new(
                        &config.kafka,
                        brokers,
                        druid,
                        &transactional_id(&config.process.group, &config.process.instance),
                        Duration::from_secs(30),
                    )?),
                    (None, Some(path), _) => Box::new(EmbeddedStore::open(path, Duration::from_secs(60))?),
                    _ => {
                        bail!("no sink: the Druid sink needs [kafka] brokers, and the embedded store a data directory")
                    }
                };
                tracing::info!(sink = sink.name(), group = %config.process.group, "process role started");
                run_process(
                    &consumer,
                    &mut transformers,
                    &mut breakers,
                    sink.as_mut(),
                    &names,
                    &settings,
                    &counters,
                    &stop_flag,
                )
            })();
            let stopping = || stop_flag.load(Ordering::Relaxed);
            match result {
                Ok(()) => return Ok(()),
                Err(e) if stopping() => return Err(e),
                Err(e) => {
                    let wait = match e.downcast_ref::<ProcessError>() {
                        Some(ProcessError::BreakerOpen { .. }) => {
                            let wait = breakers.wait(std::time::Instant::now());
                            tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "records wait in Kafka");
                            wait
                        }
                        None => {
                            if let Some(health) = &settings.health {
                                health.set("sink", false, format!("{e:#}"));
                            }
                            tracing::error!(
                                error = format!("{e:#}"),
                                "process role failed; resuming from the last commit"
                            );
                            pause = (pause * 2).min(Duration::from_secs(10));
                            pause
                        }
                    };
                    // Sleep in short steps so a stop request is not kept waiting.
                    let until = std::time::Instant::now() + wait;
                    while std::time::Instant::now() < until && !stopping() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if stopping() {
                        return Ok(());
                    }
                }
            }
        }
    })?;
    Ok(ProcessRole { thread, stop, stats, store_path })
}

impl Running {
    /// Frames read, frames dropped (queue full), records decoded, records delivered, frames refused,
    /// ids missing, sources up.
    fn counts(&self) -> [u64; 7] {
        let Some(ingest) = &self.ingest else { return [0; 7] };
        let sum = |f: &dyn Fn(&crate::pipeline::SourceHandle) -> u64| ingest.sources().iter().map(f).sum::<u64>();
        [
            sum(&|h| h.stats.frames.load(Ordering::Relaxed)),
            sum(&|h| h.stats.dropped.load(Ordering::Relaxed)),
            sum(&|h| h.decode.records.load(Ordering::Relaxed)),
            self.producer.stats().delivered.load(Ordering::Relaxed),
            sum(&|h| h.decode.rejects.load(Ordering::Relaxed)),
            sum(&|h| h.decode.gaps.load(Ordering::Relaxed)),
            ingest.sources().iter().filter(|h| h.stats.state() == crate::source::State::Up).count() as u64,
        ]
    }

    /// Rows the process role has committed to its sink.
    fn stored(&self) -> u64 {
        self.process.as_ref().map_or(0, |p| p.stats.stored.load(Ordering::Relaxed))
    }

    async fn stop(self) -> anyhow::Result<u64> {
        if let Some(ingest) = self.ingest {
            ingest.stop().await;
        }
        self.producer.flush(Duration::from_secs(30))?;
        if let Some(process) = self.process {
            // Give the process role a moment to deliver what was just handed over, then stop it: on
            // the local log until it has committed the log's end (at most 10 s), on Kafka 500 ms.
            match &self.handoff {
                Handoff::Local(log) => {
                    let until = std::time::Instant::now() + Duration::from_secs(10);
                    while log.status().lag > 0 && std::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Handoff::Kafka(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
            process.stop.store(true, Ordering::Relaxed);
            let thread = process.thread;
            tokio::task::spawn_blocking(move || thread.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the process role panicked"))??;
        }
        let _ = self.api_stop.send(true);
        if let Err(e) = self.api_task.await? {
            tracing::warn!(error = %e, "the HTTP API stopped with an error");
        }
        self.producer.close();
        Ok(self.producer.stats().delivered.load(Ordering::Relaxed))
    }
}

/// `sluice run`: the roles asked for until Ctrl-C (or SIGTERM), logging counts every ten seconds.
async fn serve(config: Config, role: Role) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Listening before starting, so a signal during the start stops it cleanly right after.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let running = start(&config, role).await?;
    tracing::info!(
        ?role,
        sources = config.sources.len(),
        handoff = %running.handoff,
        api = %running.api_addr,
        "running"
    );
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let [frames, dropped, records, delivered, rejects, gaps, up] = running.counts();
                let stored = running.stored();
                tracing::info!(frames, dropped, records, delivered, rejects, gaps, sources_up = up, stored, "counts");
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    let delivered = running.stop().await?;
    tracing::info!(delivered, "stopped");
    Ok(())
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
fn venue_sources(sim: &FeedSim, venues: &[(Venue, &[&str])]) -> Vec<SourceConfig> {
    let list = |items: Vec<String>| items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(",");
    venues
        .iter()
        .filter(|(_, symbols)| !symbols.is_empty())
        .map(|(venue, symbols)| {
            let symbols: Vec<String> = symbols.iter().map(|s| s.to_string()).collect();
            let name = venue.to_string();
            let mut s = SourceConfig::new(&name, &sim.url(*venue), &name);
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

/// `sluice demo`: simulator → sources → wasm decode → local log → transforms → store, with counts as it runs.
async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut venues: Vec<(Venue, &[&str])> = Vec::new();
    for venue in &args.venues {
        if !venues.iter().any(|(v, _)| v == venue) {
            venues.push((*venue, demo_symbols(*venue)));
        }
    }
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: args.rate, ..FeedSimConfig::default() }).await?;
    let mut config = Config {
        data_dir: args.data_dir,
        api: crate::api::ApiConfig {
            bind: args.api_addr,
            token: Some(demo_token()),
            ..crate::api::ApiConfig::default()
        },
        sources: venue_sources(&sim, &venues),
        ..Config::default()
    };
    // The Binance feed's rules as a chain: dust trades dropped, then bad prints refused.
    for source in config.sources.iter_mut().filter(|s| s.name == "binance") {
        source.transforms = Some(demo_chain());
    }
    let running = start(&config, Role::All).await?;
    println!(
        "sluice demo: {} simulated venues ({}) -> wasm decoders -> {} -> transforms -> the embedded store",
        venues.len(),
        venues.iter().map(|(v, _)| v.name()).collect::<Vec<_>>().join(", "),
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
    }
    match args.seconds {
        Some(n) => println!("running for {n} s (Ctrl-C stops earlier)"),
        None => println!("running until Ctrl-C"),
    }
    println!(
        "{:>5}  {:>9} {:>7} {:>9} {:>9} {:>7} {:>7} {:>5} {:>9}",
        "s", "frames", "dropped", "records", "delivered", "rejects", "gaps", "up", "stored"
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
        let stored = running.stored();
        println!(
            "{second:>5}  {frames:>9} {dropped:>7} {records:>9} {delivered:>9} {rejects:>9} {gaps:>7} {up:>3}/{n} {stored:>9}",
            n = venues.len()
        );
    }
    let store_path = running.process.as_ref().and_then(|p| p.store_path.clone()).context("no embedded store")?;
    let handoff = running.handoff.to_string();
    let delivered = running.stop().await?;
    sim.shutdown().await;
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
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which may hold spaces: utime and stime are the 12th and
            // 13th, in clock ticks (USER_HZ, 100 on Linux).
            let rest = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .map_or(Duration::ZERO, |ticks| Duration::from_millis(ticks * 10));
    let rss = std::fs::read_to_string("/proc/self/statm")
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
}

impl std::fmt::Display for BenchLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |q: f64| {
            if self.latency.is_empty() { f64::NAN } else { self.latency.value_at_quantile(q) as f64 / 1000.0 }
        };
        let max = if self.latency.is_empty() { f64::NAN } else { self.latency.max() as f64 / 1000.0 };
        write!(
            f,
            "{:>5} {:>9.0} {:>9.0} {:>8} {:>8} {:>10} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>5.0} {:>6}",
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
            self.rss >> 20
        )
    }
}

/// `sluice bench`: the load tool (see [`Command::Bench`]).
async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.feeds == 0 || args.rate <= 0.0 || args.seconds <= args.warmup {
        bail!("--feeds and --rate must be positive and --seconds longer than --warmup");
    }
    let per_feed = args.rate / args.feeds as f64;
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: per_feed, ..FeedSimConfig::default() }).await?;
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
            &sim,
            &[(Venue::Binance, &binance), (Venue::Coinbase, &coinbase), (Venue::Kraken, &kraken)],
        ),
        ..Config::default()
    };
    // Every source's records through one wasm transform call per batch, which passes them all.
    config.process.transforms = vec![crate::config::Link::new("rescale")];
    if let Some(brokers) = &args.brokers {
        let run = format!("sluice.bench.{}", std::process::id());
        config.kafka.brokers = brokers.clone();
        config.kafka.events_topic = format!("{run}.events");
        config.kafka.dlq_topic = format!("{run}.dlq");
        config.kafka.symbols_topic = format!("{run}.symbols");
        config.process.group = run.clone();
        if args.druid {
            config.sink.druid = Some(crate::sink::druid::DruidSinkConfig {
                overlord_url: "http://127.0.0.1:9".into(),
                topic: format!("{run}.druid"),
                ..crate::sink::druid::DruidSinkConfig::default()
            });
        }
    }
    let running = start(&config, Role::All).await?;
    let stats = running.process.as_ref().context("no process role")?.stats.clone();
    let sink = if args.druid { "the Druid topic" } else { "the embedded store" };
    println!(
        "sluice bench: {} feeds at {:.0} trades/s in total for {} s through {} into {sink} (the simulator runs in this process; CPU counts it)",
        args.feeds, args.rate, args.seconds, running.handoff
    );
    println!(
        "{:>5} {:>9} {:>9} {:>8} {:>8} {:>10} {:>7} {:>7} {:>7} {:>7} {:>5} {:>6}",
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
        "rss MB"
    );
    let mut total = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let _ = stats.receive_to_commit.take();
    let _ = stats.sink_commit.take();
    let mut commits = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2)?;
    let (mut last_cpu, _) = own_usage();
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
        if second > args.warmup {
            total.add(&latency)?;
            commits.add(&committing)?;
            window_cpu += cpu.saturating_sub(last_cpu);
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
        };
        println!("{line}");
        (last_cpu, last_committed) = (cpu, committed);
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
    sim.shutdown().await;
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    if dropped > 0 || gaps > 0 {
        bail!("{dropped} frames were dropped and {gaps} trade ids are missing");
    }
    Ok(())
}
