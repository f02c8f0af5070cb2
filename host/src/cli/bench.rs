//! `sluice bench`: the whole pipeline on embedded defaults (or through Kafka), fed by the simulator
//! as fast as asked, with a report per second of throughput, latency and CPU.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::demo::venue_sources;
use crate::config::Config;
use crate::pipeline::{Role, Running, start};
use crate::process::ProcessStats;
use feedsim::{FeedSim, FeedSimConfig, Venue};
use hdrhistogram::Histogram;

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
    latency: &'a Histogram<u64>,
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
    let temp = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temp.clone());
    let config = bench_config(&args, &sim, data_dir)?;
    let running = start(&config, Role::All).await?;
    let stats = running.process.as_ref().context("no process role")?.stats.clone();
    print_header(&args, &running.handoff);
    let meter = measure(&args, Measured { running: &running, stats: &stats, sim: &sim }).await?;
    let all = meter.all(&args, &running);
    println!("{all}");
    meter.print_notes();
    let (dropped, gaps) = (all.dropped, all.gaps);
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

/// The bench's configuration: `--feeds` symbols on the simulator (see [`bench_symbols`]), the store
/// and the local log under `data_dir`, the API on any free port, every record through the one
/// `--transform`, and with `--brokers` the hand-off through Kafka (see [`through_kafka`]).
fn bench_config(args: &BenchArgs, sim: &Simulator, data_dir: PathBuf) -> anyhow::Result<Config> {
    let names = bench_symbols(args.feeds);
    let of = |venue: Venue| names.iter().filter(|(v, _)| *v == venue).map(|(_, s)| s.as_str()).collect::<Vec<_>>();
    let (binance, coinbase, kraken) = (of(Venue::Binance), of(Venue::Coinbase), of(Venue::Kraken));
    let mut config = Config {
        data_dir,
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
        through_kafka(&mut config, args, brokers)?;
    }
    Ok(config)
}

/// `feeds` symbols named for their number, spread over Binance, Coinbase and Kraken in turn, each
/// spelled the way its venue spells pairs.
fn bench_symbols(feeds: usize) -> Vec<(Venue, String)> {
    (0..feeds)
        .map(|i| match i % 3 {
            0 => (Venue::Binance, format!("S{i}USDT")),
            1 => (Venue::Coinbase, format!("S{i}-USD")),
            _ => (Venue::Kraken, format!("S{i}/USD")),
        })
        .collect()
}

/// Hands records over through the Kafka cluster at `brokers`, on topics and in a consumer group named
/// for this run, and with `--druid` delivers to a Druid topic of the run's instead of the store.
///
/// # Errors
/// Kafka settings that do not validate (a `--kafka-option` sluice sets itself, say).
fn through_kafka(config: &mut Config, args: &BenchArgs, brokers: &str) -> anyhow::Result<()> {
    let run = format!("sluice.bench.{}", std::process::id());
    config.kafka.brokers = brokers.to_owned();
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
    Ok(())
}

/// The report's first line (what runs, through what, into what, and whose CPU it counts) and its
/// column heads.
fn print_header(args: &BenchArgs, handoff: &impl std::fmt::Display) {
    let sink = if args.druid { "the Druid topic" } else { "the embedded store" };
    let where_sim = if args.apart {
        "the simulator runs in a process of its own: cpu% is sluice's alone, sim% the simulator's"
    } else {
        "the simulator runs in this process; cpu% counts it"
    };
    println!(
        "sluice bench: {} feeds at {:.0} trades/s in total for {} s through {handoff} into {sink} ({where_sim})",
        args.feeds, args.rate, args.seconds
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
}

/// What a bench reads each second: sluice's roles, the process role's counters and the simulator.
struct Measured<'a> {
    running: &'a Running,
    stats: &'a ProcessStats,
    sim: &'a Simulator,
}

/// One look at what a bench measures.
struct Reading {
    /// Receive-to-commit latency of each row committed since the last look.
    latency: Histogram<u64>,
    /// sluice's CPU time so far.
    cpu: Duration,
    /// sluice's resident memory, in bytes.
    rss: u64,
    /// Frames dropped so far.
    dropped: u64,
    /// Trade ids missing so far.
    gaps: u64,
    /// Rows committed so far.
    committed: u64,
    /// How long each sink commit since the last look took.
    commits: Histogram<u64>,
    /// The simulator's CPU time so far, when it runs apart.
    sim_cpu: Option<Duration>,
}

impl Measured<'_> {
    /// Takes a reading (and with it the latencies recorded since the last one).
    fn read(&self) -> Reading {
        let latency = self.stats.receive_to_commit.take();
        let (cpu, rss) = own_usage();
        let [_, dropped, _, _, _, gaps, _] = self.running.counts();
        let committed = self.running.stored();
        let commits = self.stats.sink_commit.take();
        let sim_cpu = self.sim.cpu();
        Reading { latency, cpu, rss, dropped, gaps, committed, commits, sim_cpu }
    }
}

/// Prints a line a second for `--seconds` (or until Ctrl-C) and returns what the seconds after the
/// warm-up add up to.
async fn measure(args: &BenchArgs, measured: Measured<'_>) -> anyhow::Result<Meter> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    // What was recorded while the roles started belongs to no second of the report.
    let _ = measured.stats.receive_to_commit.take();
    let _ = measured.stats.sink_commit.take();
    let mut meter = Meter::new(&measured)?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    for second in 1..=args.seconds {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        meter.add_second(args, second, measured.read())?;
    }
    Ok(meter)
}

/// The bench's sums: the previous second's reading, which each second's line is the difference
/// from, and the totals of the seconds after the warm-up, which the "all" line reports.
struct Meter {
    /// Receive-to-commit latency of the rows committed after the warm-up.
    latency: Histogram<u64>,
    /// How long each sink commit after the warm-up took.
    commits: Histogram<u64>,
    /// sluice's CPU time at the end of the previous second.
    last_cpu: Duration,
    /// The simulator's CPU time at the end of the previous second, when it runs apart.
    last_sim: Option<Duration>,
    /// Rows committed at the end of the previous second.
    last_committed: u64,
    /// sluice's CPU time after the warm-up.
    cpu: Duration,
    /// The simulator's CPU time after the warm-up.
    sim_cpu: Duration,
    /// Rows committed when the warm-up ended.
    committed_at_warmup: u64,
    /// Seconds measured after the warm-up.
    measured: u64,
}

impl Meter {
    /// Starts from a first reading of CPU time and rows committed.
    fn new(measured: &Measured<'_>) -> anyhow::Result<Self> {
        let (last_cpu, _) = own_usage();
        Ok(Meter {
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 2)?,
            commits: Histogram::new_with_bounds(1, 3_600_000_000, 2)?,
            last_cpu,
            last_sim: measured.sim.cpu(),
            last_committed: measured.running.stored(),
            cpu: Duration::ZERO,
            sim_cpu: Duration::ZERO,
            committed_at_warmup: 0,
            measured: 0,
        })
    }

    /// Prints the line of `second`, read in `now`, and adds it to the totals when it is after the
    /// warm-up.
    fn add_second(&mut self, args: &BenchArgs, second: u64, now: Reading) -> anyhow::Result<()> {
        if second == args.warmup {
            self.committed_at_warmup = now.committed;
        }
        let sim_cpu = now.sim_cpu.zip(self.last_sim).map(|(now, last)| now.saturating_sub(last));
        if second > args.warmup {
            self.latency.add(&now.latency)?;
            self.commits.add(&now.commits)?;
            self.cpu += now.cpu.saturating_sub(self.last_cpu);
            self.sim_cpu += sim_cpu.unwrap_or_default();
            self.measured += 1;
        }
        let line = BenchLine {
            label: &second.to_string(),
            offered: args.rate,
            achieved: now.committed.saturating_sub(self.last_committed) as f64,
            dropped: now.dropped,
            gaps: now.gaps,
            committed: now.committed,
            latency: &now.latency,
            cpu: now.cpu.saturating_sub(self.last_cpu).as_secs_f64(),
            rss: now.rss,
            sim_cpu: sim_cpu.map(|d| d.as_secs_f64()),
        };
        println!("{line}");
        (self.last_cpu, self.last_committed, self.last_sim) = (now.cpu, now.committed, now.sim_cpu);
        Ok(())
    }

    /// The seconds measured after the warm-up, at least one (the totals are divided by it).
    fn seconds(&self) -> f64 {
        self.measured.max(1) as f64
    }

    /// The "all" line: the seconds after the warm-up, as rates per second, with the counts of now.
    fn all(&self, args: &BenchArgs, running: &Running) -> BenchLine<'_> {
        let [_, dropped, _, _, _, gaps, _] = running.counts();
        let committed = running.stored();
        let (_, rss) = own_usage();
        let seconds = self.seconds();
        BenchLine {
            label: "all",
            offered: args.rate,
            achieved: committed.saturating_sub(self.committed_at_warmup) as f64 / seconds,
            dropped,
            gaps,
            committed,
            latency: &self.latency,
            cpu: self.cpu.as_secs_f64() / seconds,
            rss,
            sim_cpu: args.apart.then(|| self.sim_cpu.as_secs_f64() / seconds),
        }
    }

    /// The lines under the "all" line: what it covers, and the sink's commits when there were any.
    fn print_notes(&self) {
        println!("(\"all\": the {} s after the warm-up; latency is receive to commit, per row)", self.measured);
        if self.commits.is_empty() {
            return;
        }
        let ms = |v: u64| v as f64 / 1000.0;
        println!(
            "sink commits: {} ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms",
            self.commits.len(),
            self.commits.len() as f64 / self.seconds(),
            ms(self.commits.value_at_quantile(0.5)),
            ms(self.commits.value_at_quantile(0.99)),
            ms(self.commits.max()),
            self.commits.mean() / 1000.0
        );
    }
}
