//! `sluice plugin new` and `sluice plugin test`: a plugin's author's loop, with no pipeline running.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use sluice_wire::{Delimited, StreamDataView, push_delimited};

use crate::chain::{Chain, Hooks};
use crate::config::Config;
use crate::deploy::plugin_bytes;
use crate::plugin::{Limits, PluginCode, PluginError, PluginInstance, Runtime, RuntimeSettings};
use crate::source::config::SourceConfig;
use crate::symbols::Symbols;
use crate::transform::{LinkState, TransformedBatch, Transformer};

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
    /// Where to write it [default: `plugins/NAME` in a sluice checkout, else `./NAME`].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The plugin-sdk crate to depend on [default: the checkout's plugin-sdk/, found from here up].
    /// Outside a checkout, `sluice plugin sdk --out DIR` writes it from this binary.
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
            "no sluice checkout here or above: pass --sdk DIR, the plugin SDK, which \
             `sluice plugin sdk --out DIR` writes from this binary"
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

/// Arguments of `sluice plugin sdk`.
#[derive(Debug, Args)]
pub struct PluginSdkArgs {
    /// The folder to write the `plugin-sdk` crate into (created; an SDK written before is replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// `sluice plugin sdk`: writes the SDK crate this binary was built with and says how to use it.
///
/// # Errors
/// As [`crate::scaffold::sdk::write_sdk`].
pub fn plugin_sdk(args: &PluginSdkArgs, out: &mut impl Write) -> anyhow::Result<PathBuf> {
    let dir = crate::scaffold::sdk::write_sdk(&args.out)?;
    writeln!(
        out,
        "wrote the plugin SDK {} to {}; next: `sluice plugin new NAME --decode|--transform --sdk {}`",
        env!("CARGO_PKG_VERSION"),
        dir.display(),
        dir.display()
    )?;
    Ok(dir)
}

/// Arguments of `sluice plugin test`.
#[derive(Debug, Args)]
pub struct PluginTestArgs {
    /// The plugin component (`.wasm`, built for wasm32-wasip2), or a bundled plugin's name
    /// (`binance`, `outlier-filter`, ...; a file of that name wins); omit it with `--source`.
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
    /// Decode the frames with this plugin instead (for plugins that only transform): a `.wasm`
    /// file or a bundled plugin's name (`binance`; a file of that name wins).
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
    /// follows the path after commas: `--then filter.wasm,min_volume=0.5`. A bundled plugin's
    /// name works as the path (`--then outlier-filter`; a file of that name wins).
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
    /// After the records, print each stateful link's state entries on stdout, one JSON line each:
    /// `{"link": I, "key": HEX, "value": HEX}` (I is the link's position: 0 for the first
    /// transform). A line `state of NAME@FORMAT: N entries, B bytes` per stateful link goes to
    /// stderr in any case.
    #[arg(long)]
    pub show_state: bool,
    /// Write the same state lines to FILE (stdout then keeps only the records, unless
    /// `--show-state` is given too).
    #[arg(long, value_name = "FILE")]
    pub state_out: Option<PathBuf>,
    /// Start the chain's stateful links from FILE (lines as `--state-out` writes them; each line's
    /// `link` says which), as a restart starts them from the store: to reproduce a decision made
    /// after one.
    #[arg(long, value_name = "FILE")]
    pub state_in: Option<PathBuf>,
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
    /// The refused record itself (a transform's reject), as records are printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<RecordLine<'a>>,
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

/// Frames per `decode` call and records per chain run.
const FRAMES_PER_CALL: usize = 256;
const RECORDS_PER_CALL: usize = 1024;

/// `sluice plugin test`: decode every line of the frames file, run all records through the chain,
/// print them; then the state the chain's stateful links hold.
///
/// # Errors
/// When the plugin, the frames file or a state file cannot be read, the plugin cannot be loaded or is
/// not a sluice plugin, or a call traps or hits a limit.
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
    // The decoder and each link (the plugin itself among them), with room for each to be replaced once.
    let links = 1 + source.as_ref().map_or(args.then.len(), |(c, s)| c.chain(s).len());
    let runtime = Runtime::new(
        RuntimeSettings { max_instances: 4 + 2 * links as u32, ..RuntimeSettings::default() },
        Arc::new(Symbols::new()),
    )?;
    let Plugins { mut decoder, mut chain, names } = open_plugins(args, source.as_ref(), &runtime)?;
    if let Some(path) = &args.state_in {
        load_state(&mut chain, path)?;
    }
    let lines = read_frames(&args.frames)?;
    let mut summary = TestSummary { frames: lines.len(), ..TestSummary::default() };
    let decoded = decode_all(&mut decoder, &lines, args.source_id, err, &mut summary)?;
    let records = run_chain(&mut chain, &names, decoded.as_bytes(), runtime.symbols(), err, &mut summary)?;
    let printed = print_records(out, &records, runtime.symbols(), &mut summary)?;
    write_state(&chain, args, out, err)?;
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
    if let (Some(expected), Some(path)) = (&expected, &args.expect) {
        compare(expected, &printed, path)?;
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

/// The plugins of a run: the decoder, and the chain of transforms with the name each link's rejects
/// carry (none for the plugin under test itself, as a transform).
struct Plugins {
    decoder: PluginInstance,
    chain: Chain,
    names: Vec<Option<String>>,
}

/// Compiles and starts the plugins the arguments name: a source's decoder and chain from its
/// configuration file, or the plugin (decoding, unless `--decode-with` decodes, and transforming)
/// followed by each `--then` link.
fn open_plugins(
    args: &PluginTestArgs,
    source: Option<&(Config, SourceConfig)>,
    runtime: &Runtime,
) -> anyhow::Result<Plugins> {
    let limits = Limits { deadline: std::time::Duration::from_millis(args.deadline_ms), ..Limits::default() };
    let compile = |name: &str, wasm: &[u8]| -> anyhow::Result<Arc<PluginCode>> {
        runtime.compile(name, wasm, limits).with_context(|| format!("cannot load plugin {name}"))
    };
    let start = |code: &Arc<PluginCode>, config: &[(String, String)]| -> anyhow::Result<PluginInstance> {
        PluginInstance::new(code, config).with_context(|| format!("cannot start plugin {}", code.name()))
    };
    let read =
        |path: &Path| -> anyhow::Result<Arc<PluginCode>> { compile(&path.display().to_string(), &read_plugin(path)?) };
    let (mut links, mut names) = (Vec::new(), Vec::new());
    let decoder = match (source, &args.plugin, &args.decode_with) {
        (Some((config, s)), _, _) => {
            let decoder = start(&compile(&s.decode, &plugin_bytes(config, &s.decode)?)?, &s.decode_pairs())?;
            for l in config.chain(s) {
                let code = compile(&l.plugin, &plugin_bytes(config, &l.plugin)?)?;
                links.push(Transformer::new(start(&code, &l.config_pairs())?));
                names.push(Some(l.plugin.clone()));
            }
            decoder
        }
        (None, Some(path), decode_with) => {
            let decoder = match decode_with {
                Some(decoder) => start(&read(decoder)?, &args.decoder_config)?,
                None => start(&read(path)?, &args.config)?,
            };
            // The plugin decodes (without `--decode-with`) and transforms: an instance for each.
            links.push(Transformer::new(start(&read(path)?, &args.config)?));
            names.push(None);
            decoder
        }
        // `--decode-with A --then B --then C`: the chain is the links alone.
        (None, None, Some(path)) => start(&read(path)?, &args.decoder_config)?,
        (None, None, None) => bail!("a plugin, --decode-with, or --source with --from, is needed"),
    };
    if source.is_none() {
        for (path, config) in &args.then {
            links.push(Transformer::new(start(&read(path)?, config)?));
            names.push(Some(path.display().to_string()));
        }
    }
    Ok(Plugins { decoder, chain: Chain::new(args.source_id, links), names })
}

/// The component a `plugin` argument names: the file at `path` when there is one, else the bundled
/// plugin of that name (`binance`, `outlier-filter`, ...), so the bundled plugins work outside a
/// checkout too.
///
/// # Errors
/// Neither a readable file nor a bundled plugin's name.
pub fn read_plugin(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(wasm) => Ok(wasm),
        Err(e) if path.exists() => Err(e).with_context(|| format!("cannot read plugin {}", path.display())),
        Err(e) => match path.to_str().and_then(crate::plugin::bundled::by_name) {
            Some(wasm) => Ok(wasm.to_vec()),
            None => Err(e).with_context(|| {
                format!(
                    "cannot read plugin {}: no such file, and no bundled plugin has that name (bundled: {})",
                    path.display(),
                    crate::plugin::bundled::names().join(", ")
                )
            }),
        },
    }
}

/// The frames file's non-empty lines, with their 1-based line numbers.
fn read_frames(path: &Path) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read frames {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in io::BufReader::new(file).split(b'\n').enumerate() {
        let mut line = line.with_context(|| format!("cannot read frames {}", path.display()))?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if !line.is_empty() {
            lines.push((i + 1, line));
        }
    }
    Ok(lines)
}

/// Decodes the frames in batches, reporting refused frames by line; stamps `source_id` on the
/// records as the host does.
fn decode_all(
    decoder: &mut PluginInstance,
    lines: &[(usize, Vec<u8>)],
    source_id: u32,
    err: &mut impl Write,
    summary: &mut TestSummary,
) -> anyhow::Result<plugin_sdk::Records> {
    let mut records = plugin_sdk::Records::new();
    let mut frames = Vec::new();
    for chunk in lines.chunks(FRAMES_PER_CALL) {
        frames.clear();
        for (_, line) in chunk {
            push_delimited(&mut frames, line);
        }
        let first = chunk.first().map_or(0, |(n, _)| *n);
        let last = chunk.last().map_or(0, |(n, _)| *n);
        let decoded = decoder.decode(&frames).with_context(|| format!("decoding frames on lines {first}..={last}"))?;
        for reject in &decoded.rejects {
            let line = chunk.get(reject.index as usize).map(|(n, _)| *n);
            write_json(
                err,
                &RejectLine { frame: line, index: None, link: None, reason: &reject.reason, record: None },
            )?;
            summary.rejects += 1;
        }
        let refused = |i: usize| decoded.rejects.iter().any(|r| r.index as usize == i);
        summary.empty_frames +=
            decoded.counts.iter().enumerate().filter(|&(i, &count)| count == 0 && !refused(i)).count();
        for item in Delimited::new(&decoded.records) {
            // The runtime validated every record before returning them.
            let view = item.and_then(StreamDataView::parse).context("decoded record")?;
            records.push(&plugin_sdk::Record { source_id, ..view.record() });
        }
    }
    Ok(records)
}

/// All `records` through the chain, in batches, as the host runs it; each reject to `err` with its
/// index among the records its link was given (naming the link, unless it is the plugin itself)
/// and the record itself.
///
/// # Errors
/// A failed call (a trap, a timeout, a limit, invalid output): an author sees it here rather than
/// the records retry and bisection would dead-letter.
fn run_chain(
    chain: &mut Chain,
    names: &[Option<String>],
    records: &[u8],
    symbols: &Symbols,
    err: &mut impl Write,
    summary: &mut TestSummary,
) -> anyhow::Result<Vec<u8>> {
    let mut hooks = Strict { names, given: vec![0; names.len()], batch: 0 };
    let items: Vec<&[u8]> = Delimited::new(records).collect::<Result<_, _>>().context("record")?;
    let (mut batch, mut output) = (Vec::new(), Vec::new());
    for chunk in items.chunks(RECORDS_PER_CALL) {
        batch.clear();
        for item in chunk {
            push_delimited(&mut batch, item);
        }
        let bases = hooks.given.clone();
        let done = chain.run(&batch, &mut hooks)?;
        for r in &done.rejects {
            let link = names.get(r.link).and_then(Option::as_deref);
            let index = Some(bases.get(r.link).copied().unwrap_or(0) + r.index);
            // The runtime checked the records a link was given: each parses.
            let view = StreamDataView::parse(&r.bytes).ok();
            let name = view.as_ref().and_then(|v| symbols.name(v.symbol_id));
            let record = view.as_ref().map(|v| record_line(v, name.as_deref()));
            write_json(err, &RejectLine { frame: None, index, link, reason: &r.reason, record })?;
            summary.rejects += 1;
        }
        output.extend_from_slice(&done.records);
    }
    Ok(output)
}

/// `plugin test` around each link: a failed call fails the run, naming the link and the records (by
/// their index among all the link was given).
struct Strict<'a> {
    names: &'a [Option<String>],
    /// Records each link was given so far.
    given: Vec<usize>,
    /// Records in the batch the link running now was given.
    batch: usize,
}

impl Hooks for Strict<'_> {
    type Error = anyhow::Error;

    fn before(&mut self, _link: usize, _plugin: &PluginCode, input: &[u8]) -> anyhow::Result<()> {
        self.batch = Delimited::new(input).count();
        Ok(())
    }

    fn after(
        &mut self,
        link: usize,
        _plugin: &PluginCode,
        outcome: Result<&TransformedBatch, &PluginError>,
    ) -> anyhow::Result<()> {
        let base = self.given.get(link).copied().unwrap_or(0);
        if let Some(given) = self.given.get_mut(link) {
            *given += self.batch;
        }
        let failure = match outcome {
            Err(e) => e,
            Ok(done) => match &done.first_failure {
                Some(e) => e,
                None => return Ok(()),
            },
        };
        let mut what = format!("transforming records {base}..{}: {failure}", (base + self.batch).saturating_sub(1));
        let mut cause = std::error::Error::source(failure);
        while let Some(e) = cause {
            what = format!("{what}: {e}");
            cause = e.source();
        }
        Err(match self.names.get(link).and_then(Option::as_deref) {
            Some(name) => anyhow::anyhow!("{name}: {what}"),
            None => anyhow::Error::msg(what),
        })
    }
}

/// Prints each record as a JSON line; returns the lines printed.
fn print_records(
    out: &mut impl Write,
    records: &[u8],
    symbols: &Symbols,
    summary: &mut TestSummary,
) -> anyhow::Result<Vec<String>> {
    let mut printed = Vec::new();
    for item in Delimited::new(records) {
        let r = item.and_then(StreamDataView::parse).context("transformed record")?;
        let name = symbols.name(r.symbol_id);
        let line = serde_json::to_string(&record_line(&r, name.as_deref()))?;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        printed.push(line);
        summary.records += 1;
    }
    Ok(printed)
}

/// A record as `plugin test` prints it, with its symbol's name.
fn record_line<'a>(r: &StreamDataView<'_>, symbol: Option<&'a str>) -> RecordLine<'a> {
    RecordLine {
        source_id: r.source_id,
        symbol,
        symbol_id: r.symbol_id,
        price_e8: r.price_e8,
        volume_e8: r.volume_e8,
        timestamp_ms: r.timestamp_ms,
        is_buy: r.is_buy,
        trade_id: r.trade_id,
    }
}

/// Fails at the first line where `printed` differs from `expected` (read from `path`).
fn compare(expected: &[String], printed: &[String], path: &Path) -> anyhow::Result<()> {
    let Some(i) = (0..expected.len().max(printed.len())).find(|&i| expected.get(i) != printed.get(i)) else {
        return Ok(());
    };
    let show = |l: Option<&String>| l.map_or_else(|| "nothing (the output ends here)".to_owned(), Clone::clone);
    bail!(
        "output differs from {} at record {} (line {}):\n  expected: {}\n  got:      {}",
        path.display(),
        i,
        i + 1,
        show(expected.get(i)),
        show(printed.get(i))
    )
}

/// One entry of a link's state, as `--show-state` and `--state-out` write it and `--state-in`
/// reads it.
#[derive(Debug, Serialize, Deserialize)]
struct StateLine {
    /// The link's position in the chain (0: the first transform).
    link: usize,
    /// The key's bytes, in hex.
    key: String,
    /// The value's bytes, in hex.
    value: String,
}

/// A line `state of NAME@FORMAT: N entries, B bytes` on `err` for each stateful link; its entries
/// on `out` with `--show-state`, into the file `--state-out` names.
fn write_state(chain: &Chain, args: &PluginTestArgs, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for (link, t) in chain.links().iter().enumerate() {
        let Some(format) = t.state().format() else { continue };
        let entries = t.state().entries();
        let (name, bytes) = (t.plugin().name(), t.state().bytes());
        writeln!(err, "state of {name}@{format}: {} entries, {bytes} bytes", entries.len())?;
        for (key, value) in entries {
            lines.push(serde_json::to_string(&StateLine { link, key: hex(&key), value: hex(&value) })?);
        }
    }
    if args.show_state {
        for line in &lines {
            writeln!(out, "{line}")?;
        }
    }
    if let Some(path) = &args.state_out {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("cannot write state to {}", path.display()))?;
    }
    Ok(())
}

/// Starts each link the state file names from its lines (JSON lines of link, key and value in hex,
/// as `--state-out` writes them), as if the store had committed them: the state of a whole chain
/// after a run can be carried into the next. A line naming a link that is not in the chain, or
/// that keeps no state, is refused.
fn load_state(chain: &mut Chain, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read state {}", path.display()))?;
    let mut by_link: std::collections::BTreeMap<usize, crate::sink::embedded::StateEntries> = Default::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", path.display(), i + 1);
        let line: StateLine = serde_json::from_str(line).with_context(at)?;
        let entry = (unhex(&line.key).with_context(at)?, unhex(&line.value).with_context(at)?);
        by_link.entry(line.link).or_default().push(entry);
    }
    let links = chain.links_mut();
    let count = links.len();
    for (index, entries) in by_link {
        let Some(link) = links.get_mut(index) else {
            bail!(
                "{} holds state of link {index}, and the chain has {count} links (0 to {})",
                path.display(),
                count.saturating_sub(1)
            );
        };
        let Some(format) = link.state().format().map(str::to_owned) else {
            bail!("{} holds state of link {index} ({}), which keeps no state", path.display(), link.plugin().name());
        };
        link.load_state(LinkState::committed(format, entries));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> anyhow::Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        bail!("hex {text:?} has an odd number of digits");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            let digits = text.get(i..i + 2).context("hex is not ASCII")?;
            u8::from_str_radix(digits, 16).with_context(|| format!("{digits:?} is not hex"))
        })
        .collect()
}

fn write_json(w: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *w, value)?;
    w.write_all(b"\n")?;
    Ok(())
}
