//! `sluice plugin new` and `sluice plugin test`: a plugin's author's loop, with no pipeline running.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use plugin_sdk::wire::{Delimited, StreamDataView, push_delimited};
use serde::Serialize;

use crate::config::Config;
use crate::pipeline::plugin_bytes;
use crate::plugin::{Limits, PluginCode, PluginInstance, Runtime, RuntimeSettings};
use crate::symbols::Symbols;

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
        PluginInstance::new(&code, config).with_context(|| format!("cannot start plugin {name}"))
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
        records = transform_all(&mut plugin, records.as_bytes(), None, args.source_id, err, &mut summary)?;
    }
    for (link, name) in thens.iter_mut().zip(&names) {
        records = transform_all(link, records.as_bytes(), Some(name), args.source_id, err, &mut summary)?;
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
/// is a `--then`), and the output records, each checked to be valid `StreamData` and stamped with
/// `source_id` as the host stamps a chain's output with its source.
fn transform_all(
    plugin: &mut PluginInstance,
    records: &[u8],
    link: Option<&str>,
    source_id: u32,
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
            if view.source_id == source_id {
                output.push_view(&view);
            } else {
                output.push(&plugin_sdk::Record { source_id, ..view.record() });
            }
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
