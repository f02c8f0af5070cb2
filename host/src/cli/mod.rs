//! The command line: `sluice run`, `demo`, `bench`, `feedsim`, `check-config`, `replay`,
//! `plugin new|test` and `druid spec`.

mod bench;
mod demo;
mod druid;
mod plugin;
mod replay;

pub use druid::{DruidSpecArgs, SpecKind};

pub use crate::pipeline::Role;
pub use bench::BenchArgs;
pub use demo::{DemoArgs, demo_chain};
pub use plugin::{
    EXIT_FRAMES_WITHOUT_RECORDS, ExitWith, PluginNewArgs, PluginSdkArgs, PluginTestArgs, TestSummary, plugin_new,
    plugin_sdk, plugin_test,
};

use std::io;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use feedsim::{FeedSim, FeedSimConfig, Venue};

/// sluice: WebSocket market data to Kafka, through sandboxed wasm plugins, to Druid.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// How log lines on stderr are written (default: `[logging] format` of the configuration file
    /// for `sluice run`, else text).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log format: `--log-format`, else the configuration file's `[logging] format` (for
    /// `sluice run` and `check-config`, when the file reads), else text.
    pub fn log_format(&self) -> crate::config::LogFormat {
        let file = match &self.command {
            Command::Run(args) => Some(&args.config),
            Command::CheckConfig(args) => Some(&args.config),
            Command::Replay(args) => Some(&args.config),
            Command::Druid(DruidCommand::Spec(args)) => Some(&args.config),
            _ => None,
        };
        self.log_format
            .or_else(|| file.and_then(|f| Config::load(f).ok()).map(|c| c.logging.format))
            .unwrap_or_default()
    }
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
    /// Replay a time range of the hand-off (the local log, or the events topic on Kafka) through
    /// each source's chain as it is now (the versions the registry has active): into a table of its
    /// own, `replay_NAME`, beside the live `rollup`, or into `rollup` itself; with the Druid sink,
    /// into a topic of its own. It can run while `sluice run` runs on the same configuration.
    Replay(replay::ReplayArgs),
    /// Work with the Druid side.
    #[command(subcommand)]
    Druid(DruidCommand),
}

/// `sluice druid ...`
#[derive(Debug, Subcommand)]
pub enum DruidCommand {
    /// Write the JSON an operator gives Druid's Overlord: the live supervisor spec, the supervisor
    /// spec of a replay's datasource (`separate`), or the task overwriting the live datasource with
    /// a replay (`reindex`).
    Spec(DruidSpecArgs),
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
    /// For this start only: when the embedded store is ahead of the local log (the log lost its
    /// last commits in a power cut with `[local_log] synchronous = "normal"`, and the store had already
    /// counted them), go on appending from the store's position instead of refusing to start.
    #[arg(long)]
    pub resume_past_lost_log_tail: bool,
    /// For this run: where the topic's retention deleted records of the events topic the embedded
    /// store had not read yet, go on from the partition's start (the records lost are logged at
    /// ERROR) instead of stopping the process role. (With the Druid sink the positions are the
    /// consumer group's: move them with Kafka's `kafka-consumer-groups.sh --reset-offsets`.)
    #[arg(long)]
    pub skip_deleted_records: bool,
}

/// Arguments of `sluice check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    pub config: PathBuf,
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
    /// Write the plugin SDK crate (with its WIT) from this binary, for `plugin new --sdk` outside a checkout.
    Sdk(PluginSdkArgs),
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
        Command::Plugin(PluginCommand::Sdk(args)) => {
            plugin_sdk(&args, &mut io::stdout())?;
            Ok(())
        }
        Command::Plugin(PluginCommand::Test(args)) => {
            let stdout = io::stdout();
            // Stderr is not locked for the whole command: the log lines the engine's compile
            // threads write there (with RUST_LOG=debug, say) would wait for it forever.
            plugin_test(&args, &mut io::BufWriter::new(stdout.lock()), &mut io::stderr())?;
            Ok(())
        }
        Command::Demo(args) => runtime()?.block_on(demo::demo(args)),
        Command::Bench(args) => runtime()?.block_on(bench::bench(args)),
        Command::Run(args) => {
            let mut config = Config::load(&args.config).map_err(anyhow::Error::msg)?;
            if let Some(addr) = args.api_addr {
                config.api.bind = addr;
            }
            config.api.token = crate::api::Secret::from_env();
            config.local_log.resume_past_lost_tail = args.resume_past_lost_log_tail;
            config.kafka.skip_deleted_records = args.skip_deleted_records;
            runtime()?.block_on(serve(config, args.role))
        }
        Command::Replay(args) => runtime()?.block_on(replay::run(args)),
        Command::Druid(DruidCommand::Spec(args)) => druid::spec(&args),
        Command::CheckConfig(args) => {
            let config = Config::load(&args.config).map_err(anyhow::Error::msg)?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Feedsim(args) => runtime()?.block_on(async {
            let config = FeedSimConfig {
                bind: args.bind,
                trades_per_second: args.rate,
                seed: feedsim::fresh_seed(),
                ..FeedSimConfig::default()
            };
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// `sluice run`: the roles asked for until Ctrl-C (or SIGTERM), logging counts every ten seconds.
async fn serve(config: Config, role: Role) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Listening before starting, so a signal during the start stops it cleanly right after.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    let delivered = crate::pipeline::run(&config, role, shutdown).await?;
    tracing::info!(delivered, "stopped");
    Ok(())
}
