//! The Druid sink against Druid's documented contracts.
//!
//! Druid cannot run here, so these tests stand up a recorded-contract Overlord instead: an axum server on
//! loopback that answers the supervisor API the way Druid's API reference documents it
//! (<https://druid.apache.org/docs/latest/api-reference/supervisor-api>): `POST /druid/indexer/v1/supervisor`
//! answers `200 {"id": <datasource>}` (or `415` for a body that is not JSON, as Druid's JAX-RS resource
//! does), `GET .../{id}/status` the documented status report, `GET .../{id}/health` `200` or `503`
//! `{"healthy": false}`, and `404 {"error": "[id] does not exist"}` for an unknown supervisor. It can be
//! told to refuse as Druid does: `400 {"error": ...}`, `401`, `403`, `503` from an Overlord without a
//! leader, `307` from a follower to the leader. Every request it sees is recorded, so the tests can check
//! what the client sent and how often.
//!
//! The rows side is checked the way Druid reads it: rows encoded by `encode_row` are decoded with nothing
//! but the descriptor a generated spec carries (as Druid's inline protobuf decoder does), to JSON by the
//! fields' JSON names, and the keys must be exactly the columns the spec reads.

use crate::common;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value, json};
use sluice::proto::{DESCRIPTOR_SET, StreamData};
use sluice::sink::druid::config::Password;
use sluice::sink::druid::{
    DruidSinkConfig, OverlordClient, OverlordError, SpecError, SupervisorHealth, SupervisorId, encode_row,
    reindex_task, replay_supervisor_spec, supervisor_spec,
};
use tokio::sync::{oneshot, watch};

const SUPERVISOR: &str = "/druid/indexer/v1/supervisor";

/// How the recorded-contract Overlord answers.
#[derive(Clone, Debug)]
enum Behaviour {
    /// As a healthy Druid leader.
    Leader,
    /// As a leader whose supervisor's tasks are failing.
    LeaderWithUnhealthyTasks,
    /// As a leader that checks basic auth and knows only this `Authorization` value.
    LeaderRequiring(String),
    /// Every request gets this status and JSON body.
    Refuse(StatusCode, Value),
    /// The first n requests get `503` as from an Overlord that knows no leader, then as [`Behaviour::Leader`].
    NoLeaderFor(usize),
    /// A follower: `307` to the same path and query on this base URL.
    FollowerOf(String),
}

/// One request as the Overlord saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: Option<String>,
    content_type: Option<String>,
    authorization: Option<String>,
    body: Bytes,
}

struct Overlord {
    url: String,
    shared: Arc<Shared>,
}

struct Shared {
    behaviour: Behaviour,
    seen: Mutex<Vec<Seen>>,
    served: AtomicUsize,
    /// Supervisors created by POSTs, by id.
    supervisors: Mutex<HashSet<String>>,
}

impl Overlord {
    async fn start(behaviour: Behaviour) -> Overlord {
        let shared = Arc::new(Shared {
            behaviour,
            seen: Mutex::new(Vec::new()),
            served: AtomicUsize::new(0),
            supervisors: Mutex::new(HashSet::new()),
        });
        let app = Router::new().fallback(answer).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Overlord { url, shared }
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
}

async fn answer(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(String::from);
    let seen = Seen {
        method: method.clone(),
        path: uri.path().to_string(),
        query: uri.query().map(String::from),
        content_type: text(header::CONTENT_TYPE),
        authorization: text(header::AUTHORIZATION),
        body: body.clone(),
    };
    s.seen.lock().unwrap().push(seen.clone());
    let n = s.served.fetch_add(1, Ordering::SeqCst);
    match &s.behaviour {
        Behaviour::Leader => druid(&s, &seen, true),
        Behaviour::LeaderWithUnhealthyTasks => druid(&s, &seen, false),
        Behaviour::LeaderRequiring(auth) => {
            if seen.authorization.as_deref() != Some(auth.as_str()) {
                // Druid's basic authenticator answers a missing or wrong password with 401.
                return StatusCode::UNAUTHORIZED.into_response();
            }
            druid(&s, &seen, true)
        }
        Behaviour::Refuse(status, body) => (*status, axum::Json(body.clone())).into_response(),
        Behaviour::NoLeaderFor(times) if n < *times => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Unable to determine destination for [/druid/indexer/v1/supervisor]; is your coordinator/overlord down?",
        )
            .into_response(),
        Behaviour::NoLeaderFor(_) => druid(&s, &seen, true),
        Behaviour::FollowerOf(leader) => {
            let query = seen.query.map(|q| format!("?{q}")).unwrap_or_default();
            let location = format!("{leader}{}{query}", seen.path);
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response()
        }
    }
}

/// Druid's supervisor API on a leader Overlord.
fn druid(s: &Shared, seen: &Seen, healthy: bool) -> Response {
    let not_found = |id: &str| {
        (StatusCode::NOT_FOUND, axum::Json(json!({ "error": format!("[{id}] does not exist") }))).into_response()
    };
    let rest = seen.path.strip_prefix(SUPERVISOR).unwrap_or("");
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    match (&seen.method, parts.as_slice()) {
        (&Method::POST, []) => {
            if seen.content_type.as_deref().map(|c| c.starts_with("application/json")) != Some(true) {
                return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
            }
            let Ok(spec) = serde_json::from_slice::<Value>(&seen.body) else {
                return (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": "Unexpected end-of-input" })))
                    .into_response();
            };
            let Some(id) = spec["spec"]["dataSchema"]["dataSource"].as_str() else {
                return (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": "Missing dataSource" }))).into_response();
            };
            s.supervisors.lock().unwrap().insert(id.to_string());
            axum::Json(json!({ "id": id })).into_response()
        }
        (&Method::GET, [id, "status"]) => {
            let id = decode(id);
            if !s.supervisors.lock().unwrap().contains(&id) {
                return not_found(&id);
            }
            let (state, detailed) =
                if healthy { ("RUNNING", "RUNNING") } else { ("UNHEALTHY_TASKS", "UNHEALTHY_TASKS") };
            // The documented sample status report.
            axum::Json(json!({
                "id": id,
                "generationTime": "2023-07-05T23:24:43.934Z",
                "payload": {
                    "dataSource": id,
                    "stream": "sluice.druid",
                    "partitions": 1,
                    "replicas": 1,
                    "durationSeconds": 3600,
                    "activeTasks": [{
                        "id": "index_kafka_social_media_ab72ae4127c591c_flcbhdlh",
                        "startingOffsets": { "0": 3176381 },
                        "startTime": "2023-07-05T23:21:39.321Z",
                        "remainingSeconds": 3415,
                        "type": "ACTIVE",
                        "currentOffsets": { "0": 3296632 },
                        "lag": { "0": 3 }
                    }],
                    "publishingTasks": [],
                    "latestOffsets": { "0": 3296635 },
                    "minimumLag": { "0": 3 },
                    "aggregateLag": 3,
                    "offsetsLastUpdated": "2023-07-05T23:24:30.212Z",
                    "suspended": false,
                    "healthy": healthy,
                    "state": state,
                    "detailedState": detailed,
                    "recentErrors": []
                }
            }))
            .into_response()
        }
        (&Method::GET, [id, "health"]) => {
            let id = decode(id);
            if !s.supervisors.lock().unwrap().contains(&id) {
                return not_found(&id);
            }
            let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, axum::Json(json!({ "healthy": healthy }))).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A percent-encoded path segment, decoded (the tests' ids only need `%20`).
fn decode(segment: &str) -> String {
    segment.replace("%20", " ")
}

fn config(overlord: &Overlord) -> DruidSinkConfig {
    DruidSinkConfig { overlord_url: overlord.url.clone(), retry_backoff_ms: 10, ..Default::default() }
}

fn client(cfg: &DruidSinkConfig) -> OverlordClient {
    OverlordClient::from_config(cfg).unwrap()
}

const BROKERS: &str = "kafka-1:9092";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

#[tokio::test]
async fn submit_posts_the_spec_as_json_with_skip_restart_and_basic_auth() {
    let overlord = Overlord::start(Behaviour::LeaderRequiring(basic("sluice", "hunter2"))).await;
    let cfg = DruidSinkConfig {
        username: Some("sluice".into()),
        password: Some(Password("hunter2".into())),
        ..config(&overlord)
    };
    let id = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap();
    assert_eq!(id, SupervisorId("sluice_trades".into()));

    let seen = overlord.seen();
    assert_eq!(seen.len(), 1);
    let post = &seen[0];
    assert_eq!(post.method, Method::POST);
    assert_eq!(post.path, SUPERVISOR);
    assert_eq!(post.query.as_deref(), Some("skipRestartIfUnmodified=true"));
    assert_eq!(post.content_type.as_deref(), Some("application/json"));
    assert_eq!(post.authorization.as_deref(), Some(basic("sluice", "hunter2").as_str()));
    let sent: Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(sent, supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS).unwrap().into_json());
}

#[tokio::test]
async fn without_a_username_no_authorization_is_sent_and_druid_says_401() {
    let overlord = Overlord::start(Behaviour::LeaderRequiring(basic("sluice", "hunter2"))).await;
    let cfg = config(&overlord);
    let err = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap_err();
    assert!(matches!(err, OverlordError::Unauthorized), "{err:?}");
    let seen = overlord.seen();
    assert_eq!(seen.len(), 1, "a 401 is not retried");
    assert_eq!(seen[0].authorization, None);
}

#[tokio::test]
async fn each_refusal_becomes_its_typed_error_without_retries() {
    let cases = [
        (StatusCode::BAD_REQUEST, json!({ "error": "Cannot construct instance of `KafkaSupervisorSpec`" })),
        (
            StatusCode::BAD_REQUEST,
            json!({
                "error": "druidException",
                "errorCode": "invalidInput",
                "persona": "USER",
                "category": "INVALID_INPUT",
                "errorMessage": "Invalid value for field [dataSource]"
            }),
        ),
        (StatusCode::UNAUTHORIZED, json!({})),
        (StatusCode::FORBIDDEN, json!({ "Access-Check-Result": "Unauthorized" })),
        (StatusCode::NOT_FOUND, json!({ "error": "[sluice_trades] does not exist" })),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({})),
        (StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": "boom" })),
    ];
    for (status, body) in cases {
        let overlord = Overlord::start(Behaviour::Refuse(status, body)).await;
        let cfg = config(&overlord);
        let err = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap_err();
        match (status.as_u16(), &err) {
            (400, OverlordError::BadRequest { message }) => {
                assert!(
                    message == "Cannot construct instance of `KafkaSupervisorSpec`"
                        || message == "Invalid value for field [dataSource]",
                    "{message}"
                );
            }
            (401, OverlordError::Unauthorized)
            | (403, OverlordError::Forbidden { .. })
            | (404, OverlordError::NotFound { .. })
            | (415, OverlordError::UnsupportedMediaType)
            | (500, OverlordError::Unexpected { status: 500, .. }) => {}
            _ => panic!("{status} became {err:?}"),
        }
        assert!(!err.is_retriable());
        assert_eq!(overlord.seen().len(), 1, "{status} was asked once");
    }
}

#[tokio::test]
async fn a_leaderless_overlord_is_retried_until_a_leader_answers() {
    let overlord = Overlord::start(Behaviour::NoLeaderFor(2)).await;
    let cfg = config(&overlord);
    let id = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap();
    assert_eq!(id.0, "sluice_trades");
    let seen = overlord.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.query.as_deref() == Some("skipRestartIfUnmodified=true")));
}

#[tokio::test]
async fn a_leaderless_overlord_is_given_up_on_after_the_attempts() {
    let overlord = Overlord::start(Behaviour::NoLeaderFor(usize::MAX)).await;
    let cfg = DruidSinkConfig { max_attempts: 3, ..config(&overlord) };
    let err = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap_err();
    match &err {
        OverlordError::NotLeader { message } => assert!(message.contains("is your coordinator/overlord down")),
        other => panic!("{other:?}"),
    }
    assert_eq!(overlord.seen().len(), 3);
}

#[tokio::test]
async fn a_follower_redirects_to_the_leader_which_gets_the_same_request() {
    let auth = basic("sluice", "hunter2");
    let leader = Overlord::start(Behaviour::LeaderRequiring(auth.clone())).await;
    let follower = Overlord::start(Behaviour::FollowerOf(leader.url.clone())).await;
    let cfg = DruidSinkConfig {
        username: Some("sluice".into()),
        password: Some(Password("hunter2".into())),
        ..config(&follower)
    };
    let c = client(&cfg);
    let id = c.apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap();
    assert_eq!(follower.seen().len(), 1);
    let at_leader = leader.seen();
    assert_eq!(at_leader.len(), 1);
    assert_eq!(at_leader[0].method, Method::POST);
    assert_eq!(at_leader[0].query.as_deref(), Some("skipRestartIfUnmodified=true"));
    assert_eq!(at_leader[0].authorization.as_deref(), Some(auth.as_str()));
    assert_eq!(at_leader[0].body, follower.seen()[0].body);

    // Reads are redirected too.
    assert_eq!(c.status(&id).await.unwrap().state, "RUNNING");
    assert_eq!(follower.seen().len(), 2);
}

#[tokio::test]
async fn an_invalid_spec_never_reaches_the_overlord() {
    let overlord = Overlord::start(Behaviour::Leader).await;
    let cfg = DruidSinkConfig { datasource: ".hidden".into(), ..config(&overlord) };
    let err = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap_err();
    assert!(matches!(err, OverlordError::Spec(SpecError::Datasource { .. })), "{err:?}");
    let mut cfg = config(&overlord);
    cfg.dimensions.push("venue".into());
    let err = client(&cfg).apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap_err();
    assert!(matches!(err, OverlordError::Spec(SpecError::UnknownColumn { .. })), "{err:?}");
    assert_eq!(overlord.seen().len(), 0);
}

#[tokio::test]
async fn status_and_health_read_druids_answers() {
    let overlord = Overlord::start(Behaviour::Leader).await;
    let cfg = DruidSinkConfig { datasource: "ticks 1m".into(), ..config(&overlord) };
    let c = client(&cfg);
    let unknown = c.status(&SupervisorId("ticks 1m".into())).await.unwrap_err();
    match unknown {
        OverlordError::NotFound { message } => assert_eq!(message, "[ticks 1m] does not exist"),
        other => panic!("{other:?}"),
    }
    let id = c.apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap();
    let status = c.status(&id).await.unwrap();
    assert_eq!(status.state, "RUNNING");
    assert_eq!(status.detailed_state.as_deref(), Some("RUNNING"));
    assert!(status.healthy);
    assert!(!status.suspended);
    assert_eq!(status.aggregate_lag, Some(3));
    assert!(c.health(&id).await.unwrap());
    let paths: Vec<_> = overlord.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths[2], "/druid/indexer/v1/supervisor/ticks%201m/status");
    assert_eq!(paths[3], "/druid/indexer/v1/supervisor/ticks%201m/health");
}

#[tokio::test]
async fn an_unhealthy_supervisor_is_a_503_verdict_not_a_missing_leader() {
    let overlord = Overlord::start(Behaviour::LeaderWithUnhealthyTasks).await;
    let cfg = config(&overlord);
    let c = client(&cfg);
    let id = c.apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap();
    assert!(!c.health(&id).await.unwrap());
    assert_eq!(overlord.seen().len(), 2, "the verdict is not retried");
    assert_eq!(c.status(&id).await.unwrap().state, "UNHEALTHY_TASKS");
}

#[tokio::test]
async fn an_unreachable_overlord_is_a_connection_error_after_the_attempts() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let cfg = DruidSinkConfig { overlord_url: url, max_attempts: 2, retry_backoff_ms: 10, ..Default::default() };
    let err = client(&cfg).status(&SupervisorId("x".into())).await.unwrap_err();
    assert!(matches!(err, OverlordError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn the_health_watcher_publishes_the_latest_poll_and_stops_on_shutdown() {
    let overlord = Overlord::start(Behaviour::Leader).await;
    let cfg = config(&overlord);
    let c = client(&cfg);
    let id = c.apply(&cfg, DESCRIPTOR_SET, BROKERS).await.unwrap();

    let (tx, mut rx) = watch::channel(SupervisorHealth::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        c.watch_health(id, Duration::from_millis(20), tx, async {
            let _ = stopped.await;
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
    let h = rx.borrow_and_update().clone();
    assert!(h.healthy);
    assert_eq!(h.state.as_deref(), Some("RUNNING"));
    assert_eq!(h.aggregate_lag, Some(3));
    assert_eq!(h.last_error, None);
    assert!(h.last_checked.is_some());
    // It keeps polling on its interval.
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), watcher).await.unwrap().unwrap();
    let polls = overlord.seen().iter().filter(|s| s.path.ends_with("/health")).count();
    assert!(polls >= 2, "{polls}");
}

#[test]
fn rows_decode_with_only_the_specs_descriptor_to_exactly_the_specs_columns() {
    let live = supervisor_spec(&DruidSinkConfig::default(), DESCRIPTOR_SET, BROKERS).unwrap().into_json();
    rows_decode_to_exactly_the_columns_of(&live);
    // A replay's datasource reads its topic's rows the same way.
    let replay =
        replay_supervisor_spec(&DruidSinkConfig::default(), DESCRIPTOR_SET, BROKERS, "fix").unwrap().into_json();
    rows_decode_to_exactly_the_columns_of(&replay);
}

/// Rows `encode_row` writes decode, with nothing but the descriptor `spec` carries, to JSON whose keys
/// are exactly the columns `spec` reads, with the trades' values.
fn rows_decode_to_exactly_the_columns_of(spec: &Value) {
    let decoder = &spec["spec"]["ioConfig"]["inputFormat"]["protoBytesDecoder"];
    let descriptor =
        base64::engine::general_purpose::STANDARD.decode(decoder["descriptorString"].as_str().unwrap()).unwrap();
    let pool = DescriptorPool::decode(descriptor.as_slice()).unwrap();
    let message = pool.get_message_by_name(decoder["protoMessageType"].as_str().unwrap()).unwrap();

    let schema = &spec["spec"]["dataSchema"];
    let mut columns = BTreeSet::new();
    columns.insert(schema["timestampSpec"]["column"].as_str().unwrap().to_string());
    for d in schema["dimensionsSpec"]["dimensions"].as_array().unwrap() {
        columns.insert(d.as_str().unwrap().to_string());
    }
    for m in schema["metricsSpec"].as_array().unwrap() {
        if let Some(f) = m["fieldName"].as_str() {
            columns.insert(f.to_string());
        }
    }

    let trades = [
        (
            StreamData {
                timestamp_ms: 1_700_000_000_123,
                price_e8: 6_512_345_000_000,
                volume_e8: 150_000_000,
                is_buy: true,
                source_id: 1,
                symbol_id: 4,
                trade_id: 77,
                received_at_us: 1_700_000_000_200_000,
            },
            "binance",
            "BTCUSDT",
        ),
        (
            StreamData {
                timestamp_ms: 1_700_000_060_000,
                price_e8: 250_000_000,
                volume_e8: 4_000_000_000,
                is_buy: false,
                ..Default::default()
            },
            "kraken",
            "XBT/USD",
        ),
    ];
    let mut buf = Vec::new();
    let mut decoded = Vec::new();
    for (trade, source, symbol) in &trades {
        buf.clear();
        encode_row(trade, source, symbol, &mut buf);
        let row = DynamicMessage::decode(message.clone(), buf.as_slice()).unwrap();
        // Protobuf's JSON mapping, as Druid's protobuf input format applies it: JSON names, 64-bit
        // integers as strings.
        let json = serde_json::to_value(&row).unwrap();
        let keys: BTreeSet<String> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, columns);
        assert_eq!(json["timestampMs"].as_str().unwrap().parse::<i64>().unwrap(), trade.timestamp_ms);
        assert_eq!(json["source"], *source);
        assert_eq!(json["symbol"], *symbol);
        assert_eq!(json["side"], if trade.is_buy { "buy" } else { "sell" });
        decoded.push(json);
    }
    assert_eq!(decoded[0]["price"], 65_123.45);
    assert_eq!(decoded[0]["qty"], 1.5);
    assert_eq!(decoded[0]["notional"], 65_123.45 * 1.5);
    assert_eq!(decoded[1]["price"], 2.5);
    assert_eq!(decoded[1]["qty"], 40.0);
    assert_eq!(decoded[1]["notional"], 100.0);
}

/// Every key path of `value` (object keys joined by `.`, array elements as `[]`).
fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.insert(path.clone());
                key_paths(v, &path, out);
            }
        }
        Value::Array(items) => {
            for v in items {
                key_paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/druid").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every field the generated specs and the reindex task set is one the reference JSON of its kind
/// has in the same place: the live and replay supervisor specs against the reference Kafka
/// supervisor spec, the task against a reference `index_parallel` task reading the `druid` input
/// source (both in `fixtures/druid/`).
#[test]
fn generated_json_sets_only_fields_the_reference_specs_have_where_they_have_them() {
    let cfg = DruidSinkConfig {
        late_message_rejection_period: Some("PT6H".into()),
        early_message_rejection_period: Some("PT2H".into()),
        ..DruidSinkConfig::default()
    };
    let mut reference = BTreeSet::new();
    key_paths(&fixture("supervisor-example.json"), "", &mut reference);
    for spec in [
        supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS).unwrap().into_json(),
        replay_supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS, "fix").unwrap().into_json(),
    ] {
        let mut generated = BTreeSet::new();
        key_paths(&spec, "", &mut generated);
        let extra: Vec<_> = generated.difference(&reference).collect();
        assert!(extra.is_empty(), "not in the reference supervisor spec: {extra:?}");
    }
    let mut reference = BTreeSet::new();
    key_paths(&fixture("reindex-example.json"), "", &mut reference);
    let task = reindex_task(&cfg, DESCRIPTOR_SET, BROKERS, "fix", 1_796_140_800_000, 1_796_144_400_000).unwrap();
    let mut generated = BTreeSet::new();
    key_paths(task.json(), "", &mut generated);
    let extra: Vec<_> = generated.difference(&reference).collect();
    assert!(extra.is_empty(), "not in the reference reindex task: {extra:?}");
}

/// The reindex task reads the replay's datasource as its supervisor spec builds it: every column the
/// task reads is a dimension or metric of that datasource (or `__time`), each metric folds the
/// replay's column of its own name with the aggregator that combines the live metric, and the
/// interval the task reads is the one it locks and overwrites.
#[test]
fn the_reindex_task_reads_exactly_the_replay_datasources_columns() {
    let cfg = DruidSinkConfig::default();
    let replay = replay_supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS, "fix").unwrap().into_json();
    let live = supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS).unwrap().into_json();
    let task = reindex_task(&cfg, DESCRIPTOR_SET, BROKERS, "fix", 1_796_140_800_000, 1_796_141_000_000).unwrap();
    let task = task.json();
    let replay_schema = &replay["spec"]["dataSchema"];
    let mut columns: BTreeSet<String> = ["__time".to_owned()].into();
    for d in replay_schema["dimensionsSpec"]["dimensions"].as_array().unwrap() {
        columns.insert(d.as_str().unwrap().to_owned());
    }
    for m in replay_schema["metricsSpec"].as_array().unwrap() {
        columns.insert(m["name"].as_str().unwrap().to_owned());
    }
    let schema = &task["spec"]["dataSchema"];
    let io = &task["spec"]["ioConfig"];
    assert_eq!(io["inputSource"]["type"], "druid");
    assert_eq!(io["inputSource"]["dataSource"], replay_schema["dataSource"]);
    assert!(io.get("inputFormat").is_none(), "the druid input source takes no inputFormat");
    assert_eq!(schema["dataSource"], live["spec"]["dataSchema"]["dataSource"]);
    assert_eq!(schema["dimensionsSpec"], live["spec"]["dataSchema"]["dimensionsSpec"]);
    assert!(columns.contains(schema["timestampSpec"]["column"].as_str().unwrap()));
    let live_metrics = live["spec"]["dataSchema"]["metricsSpec"].as_array().unwrap();
    let metrics = schema["metricsSpec"].as_array().unwrap();
    assert_eq!(metrics.len(), live_metrics.len());
    for (m, l) in metrics.iter().zip(live_metrics) {
        let field = m["fieldName"].as_str().unwrap();
        assert!(columns.contains(field), "{field} is not a column of the replay datasource");
        assert_eq!((&m["name"], field), (&l["name"], l["name"].as_str().unwrap()));
        let combining = if l["type"] == "count" { "longSum" } else { l["type"].as_str().unwrap() };
        assert_eq!(m["type"], combining, "{m}");
    }
    for key in ["segmentGranularity", "queryGranularity", "rollup"] {
        assert_eq!(schema["granularitySpec"][key], live["spec"]["dataSchema"]["granularitySpec"][key], "{key}");
    }
    assert_eq!(schema["granularitySpec"]["intervals"], json!([io["inputSource"]["interval"]]));
    assert_eq!(io["appendToExisting"], false);
    assert_eq!(io["dropExisting"], true);
}

/// `sluice druid spec` writes, for a configuration file, the same JSON as the library for each kind,
/// says where it goes, and refuses what cannot be generated with a message naming why.
#[test]
fn sluice_druid_spec_writes_each_kind_and_refuses_what_it_cannot_generate() {
    let dir = common::fresh_dir("druid-spec");
    let config = dir.join("sluice.toml");
    let toml = "[kafka]\nbrokers = \"kafka-1:9092\"\n\n[sink.druid]\noverlord_url = \"http://overlord:8081\"\ndatasource = \"trades\"\n";
    std::fs::write(&config, toml).unwrap();
    let cfg = sluice::config::Config::load(&config).unwrap();
    let druid = cfg.sink.druid.as_ref().unwrap();
    let spec = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["druid", "spec", "--config"])
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let json = |out: &std::process::Output| -> Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let live = spec(&["live"]);
    assert_eq!(json(&live), supervisor_spec(druid, DESCRIPTOR_SET, BROKERS).unwrap().into_json());
    assert!(String::from_utf8_lossy(&live.stderr).contains("http://overlord:8081/druid/indexer/v1/supervisor"));
    let separate = spec(&["separate", "--name", "fix"]);
    assert_eq!(json(&separate), replay_supervisor_spec(druid, DESCRIPTOR_SET, BROKERS, "fix").unwrap().into_json());
    let stderr = String::from_utf8_lossy(&separate.stderr);
    assert!(stderr.contains("the topic sluice.druid.replay.fix into the datasource trades_replay_fix"), "{stderr}");
    // Into a file, with times as RFC 3339 or milliseconds.
    let out = dir.join("task.json");
    let reindex = spec(&[
        "--out",
        out.to_str().unwrap(),
        "reindex",
        "--name",
        "fix",
        "--since",
        "2026-12-01T14:37:00Z",
        "--until",
        "1796144700000",
    ]);
    assert!(reindex.status.success(), "{}", String::from_utf8_lossy(&reindex.stderr));
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let since = plugin_sdk::time::rfc3339_to_ms("2026-12-01T14:37:00Z").unwrap();
    let want = reindex_task(druid, DESCRIPTOR_SET, BROKERS, "fix", since, 1_796_144_700_000).unwrap();
    assert_eq!(written, want.into_json());
    let stderr = String::from_utf8_lossy(&reindex.stderr);
    assert!(
        stderr.contains("/druid/indexer/v1/task: it overwrites trades from 2026-12-01T14:00:00.000Z to"),
        "{stderr}"
    );
    // Refusals.
    let refused = |args: &[&str], says: &str| {
        let out = spec(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    };
    refused(&["separate", "--name", "Bad/Name"], "replay table name");
    refused(&["reindex", "--name", "fix", "--since", "1796144700000", "--until", "1796140800000"], "interval is empty");
    refused(&["reindex", "--name", "fix", "--since", "yesterday", "--until", "1"], "neither RFC 3339");
    std::fs::write(&config, "[kafka]\nbrokers = \"kafka-1:9092\"\n").unwrap();
    refused(&["live"], "has no [sink.druid]");
    let _ = std::fs::remove_dir_all(&dir);
}
