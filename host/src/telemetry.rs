//! Every metric sluice exports, named in one place: `sluice_<subsystem>_<name>_<unit>`, counters end
//! in `_total`, and labels are bounded (never a symbol). `GET /metrics` renders them in Prometheus'
//! text format.

use prometheus::{Encoder, IntGauge, Registry, TextEncoder};

/// The registry and the metrics in it.
pub struct Metrics {
    registry: Registry,
    /// 1 while Druid reports the supervisor healthy, else 0.
    pub druid_supervisor_healthy: IntGauge,
    /// Druid's aggregate lag behind the Druid topic, in messages (from the supervisor's status).
    pub druid_supervisor_lag_messages: IntGauge,
    /// Failed Overlord calls (apply or poll) since start.
    pub druid_overlord_errors_total: prometheus::IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let healthy = IntGauge::new(
            "sluice_druid_supervisor_healthy",
            "1 while Druid reports the Kafka supervisor healthy, else 0",
        )
        .expect("a valid metric name");
        let lag = IntGauge::new(
            "sluice_druid_supervisor_lag_messages",
            "Druid's aggregate lag behind the Druid topic, in messages",
        )
        .expect("a valid metric name");
        let errors = prometheus::IntCounter::new(
            "sluice_druid_overlord_errors_total",
            "Overlord calls (applying the spec, polling the supervisor) that failed",
        )
        .expect("a valid metric name");
        for m in [
            Box::new(healthy.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lag.clone()),
            Box::new(errors.clone()),
        ] {
            registry.register(m).expect("each metric is registered once");
        }
        Metrics {
            registry,
            druid_supervisor_healthy: healthy,
            druid_supervisor_lag_messages: lag,
            druid_overlord_errors_total: errors,
        }
    }

    /// Everything, in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a collector error would leave that metric out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_by_its_name() {
        let m = Metrics::new();
        m.druid_supervisor_healthy.set(1);
        m.druid_supervisor_lag_messages.set(42);
        m.druid_overlord_errors_total.inc();
        let text = m.render();
        for line in [
            "sluice_druid_supervisor_healthy 1",
            "sluice_druid_supervisor_lag_messages 42",
            "sluice_druid_overlord_errors_total 1",
            "# TYPE sluice_druid_overlord_errors_total counter",
            "# TYPE sluice_druid_supervisor_healthy gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
