//! `GET /v1/dead-letters?source=&link=&limit=&before=`: the records the embedded store's dead
//! letters hold, newest first, each decoded (its `StreamData` fields, the symbol's name from the
//! dictionary), with its source, the link (`name` and `version`) that refused it and why.
//!
//! Pages go back in time: `next_before` of one answer is the `before` of the next. A payload that
//! is not a record (cut at its cap, or a stage that keeps frames) comes back as `bytes_hex`
//! instead of `record`. With the Druid sink the dead letters are in the Kafka dead-letter topic,
//! which this route does not read: it answers 404 `dead_letters_elsewhere` naming the topic.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::handoff::dead_letters::{PageOf, StoredDeadLetter};
use crate::symbols::Symbols;

/// Dead letters a page holds when the request names no `limit`, and the most it may ask for.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1_000;
/// The most payload bytes shown as hex when a payload is not a record.
const HEX_BYTES: usize = 256;

/// The query string.
#[derive(Debug, Deserialize)]
pub(super) struct Params {
    source: Option<String>,
    link: Option<String>,
    limit: Option<usize>,
    before: Option<i64>,
}

/// Where this instance's dead letters are, as the API reaches them.
#[derive(Debug, Default)]
pub struct DeadLetterSource {
    /// The symbol dictionary, once open: names for the records' symbol ids.
    pub symbols: OnceLock<Arc<Symbols>>,
    /// The dead-letter topic, when the dead letters are in Kafka rather than in a store here.
    pub topic: OnceLock<String>,
}

#[derive(Serialize)]
struct Page {
    dead_letters: Vec<Letter>,
    /// The `before` of the next (older) page; `null` when this one is the last.
    next_before: Option<i64>,
}

#[derive(Serialize)]
struct Letter {
    id: i64,
    at_ms: i64,
    stage: String,
    source: String,
    /// The refusing plugin's name and version (`name@version` split).
    link: String,
    version: Option<String>,
    reason: String,
    /// The payload's original length in bytes.
    length: u64,
    record: Option<RecordView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_hex: Option<String>,
}

#[derive(Serialize)]
struct RecordView {
    source_id: u32,
    symbol: Option<String>,
    symbol_id: u32,
    price: String,
    volume: String,
    price_e8: i64,
    volume_e8: i64,
    timestamp_ms: i64,
    is_buy: bool,
    trade_id: u64,
    received_at_us: i64,
}

/// `GET /v1/dead-letters`.
pub(super) async fn list(
    State(state): State<ApiState>,
    params: Result<Query<Params>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let Some(path) = state.store.clone() else {
        return Err(ApiError::DeadLettersElsewhere(match state.dead_letters.topic.get() {
            Some(topic) => format!(
                "this instance keeps no dead letters: with the Druid sink (or the ingest role alone) they are \
                 in the Kafka topic {topic}, one message each with the bytes as its value and the source, \
                 plugin and reason as headers"
            ),
            None => "this instance keeps no dead letters (it runs no process role with the embedded store)".into(),
        }));
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_LIMIT}, not {limit}")));
    }
    let permit = state
        .query
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Unavailable("too many queries are running; try again later".to_owned()))?;
    let symbols = state.dead_letters.symbols.get().cloned();
    let page = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let of = PageOf {
            source: params.source.as_deref(),
            link: params.link.as_deref(),
            before: params.before,
            limit: limit + 1,
        };
        let mut rows = crate::sink::embedded::read_dead_letters(&path, of)
            .map_err(|e| ApiError::Unavailable(format!("the embedded store cannot be read: {e}")))?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_before = if more { rows.last().map(|r| r.id) } else { None };
        // Each symbol asked once a page: a name the dictionary lacks may cost it a read of its topic.
        let mut names = std::collections::HashMap::new();
        let mut name = |id: u32| -> Option<String> {
            names.entry(id).or_insert_with(|| symbols.as_ref().and_then(|s| s.name(id)).map(|n| n.to_string())).clone()
        };
        let dead_letters = rows.into_iter().map(|r| letter(r, &mut name)).collect();
        Ok::<_, ApiError>(Page { dead_letters, next_before })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the dead-letter read failed: {e}")))??;
    Ok(Json(serde_json::to_value(page).map_err(|e| ApiError::Internal(e.to_string()))?))
}

/// A stored dead letter as the route shows it: its payload decoded when it is a record.
fn letter(r: StoredDeadLetter, name: &mut impl FnMut(u32) -> Option<String>) -> Letter {
    let (link, version) = match r.plugin.split_once('@') {
        Some((name, version)) => (name.to_owned(), Some(version.to_owned())),
        None => (r.plugin.clone(), None),
    };
    let whole = r.length == r.bytes.len() as u64;
    let record =
        plugin_sdk::StreamDataView::parse(&r.bytes).ok().filter(|_| r.stage == "transform" && whole).map(|v| {
            RecordView {
                source_id: v.source_id,
                symbol: name(v.symbol_id),
                symbol_id: v.symbol_id,
                price: plugin_sdk::decimal::format_e8(v.price_e8),
                volume: plugin_sdk::decimal::format_e8(v.volume_e8),
                price_e8: v.price_e8,
                volume_e8: v.volume_e8,
                timestamp_ms: v.timestamp_ms,
                is_buy: v.is_buy,
                trade_id: v.trade_id,
                received_at_us: v.received_at_us,
            }
        });
    let bytes_hex = record.is_none().then(|| r.bytes.iter().take(HEX_BYTES).map(|b| format!("{b:02x}")).collect());
    Letter {
        id: r.id,
        at_ms: r.at_ms,
        stage: r.stage,
        source: r.source,
        link,
        version,
        reason: r.reason,
        length: r.length,
        record,
        bytes_hex,
    }
}
