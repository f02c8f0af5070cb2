//! Keeps the Druid supervisor running: applies its spec through the Overlord (again after
//! failures) and polls its status and health, for `/health/ready` and the metrics.

use std::sync::Arc;
use std::time::Duration;

use super::{DruidSinkConfig, OverlordClient};
use crate::telemetry::Metrics;
use crate::telemetry::health::Health;

/// Applies the Druid supervisor spec through the Overlord (again after failures) and then polls the
/// supervisor's status and health, for `/health/ready`.
pub async fn keep_supervisor(
    druid: DruidSinkConfig,
    brokers: String,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match OverlordClient::from_config(&druid) {
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
