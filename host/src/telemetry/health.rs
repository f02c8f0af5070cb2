//! Health: a registry of named checks that components update from any thread, read by
//! `/health/ready`.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// What a check that was expected but has not reported says.
const NOT_REPORTED: &str = "not reported yet";

/// One check's latest report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Whether the component is fit to serve.
    pub ok: bool,
    /// What it last said, for the operator reading the body.
    pub detail: String,
}

/// All checks at one moment, as `/health/ready` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// True when every listed check is ok.
    pub ready: bool,
    /// Checks by name.
    pub checks: BTreeMap<&'static str, Check>,
}

/// The registry of checks (Kafka reachable, plugins loaded, sink healthy, breakers closed, ...).
///
/// A check is listed once it is set, or once it is expected: an expected check that has not reported
/// counts as not ready, so a process is not ready before each of its components has said it is.
/// Updates take a short lock; call [`Health::set`] when a state changes or once per batch, not per
/// record.
#[derive(Debug, Default)]
pub struct Health {
    /// By name; `None` for an expected check that has not reported.
    checks: Mutex<BTreeMap<&'static str, Option<Check>>>,
}

impl Health {
    /// A registry with no checks: ready.
    pub fn new() -> Self {
        Health::default()
    }

    /// Declares a check that must report before the process is ready. A check already reported
    /// keeps its report.
    pub fn expect(&self, name: &'static str) {
        self.lock().entry(name).or_insert(None);
    }

    /// Records check `name`'s state, replacing its last report.
    pub fn set(&self, name: &'static str, ok: bool, detail: impl Into<String>) {
        let check = Check { ok, detail: detail.into() };
        self.lock().insert(name, Some(check));
    }

    /// Every listed check and whether all are ok.
    pub fn snapshot(&self) -> Readiness {
        let checks: BTreeMap<&'static str, Check> = self
            .lock()
            .iter()
            .map(|(name, check)| {
                let check = check.clone().unwrap_or_else(|| Check { ok: false, detail: NOT_REPORTED.to_owned() });
                (*name, check)
            })
            .collect();
        Readiness { ready: checks.values().all(|c| c.ok), checks }
    }

    /// Whether every listed check is ok.
    pub fn ready(&self) -> bool {
        self.lock().values().all(|c| c.as_ref().is_some_and(|c| c.ok))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<Check>>> {
        // A panic while holding the lock cannot leave the map half-updated (each update is one insert),
        // so a poisoned lock is still good to read.
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_registry_is_ready() {
        let h = Health::new();
        assert!(h.ready());
        assert_eq!(h.snapshot(), Readiness { ready: true, checks: BTreeMap::new() });
    }

    #[test]
    fn ready_only_when_every_check_is_ok() {
        let h = Health::new();
        h.set("kafka", true, "connected");
        h.set("sink", false, "store locked");
        assert!(!h.ready());
        let s = h.snapshot();
        assert!(!s.ready);
        assert_eq!(s.checks["sink"], Check { ok: false, detail: "store locked".into() });
        h.set("sink", true, "ok");
        assert!(h.ready());
        assert!(h.snapshot().ready);
    }

    #[test]
    fn an_expected_check_counts_as_failing_until_it_reports() {
        let h = Health::new();
        h.expect("plugins");
        assert!(!h.ready());
        assert_eq!(h.snapshot().checks["plugins"], Check { ok: false, detail: NOT_REPORTED.into() });
        h.set("plugins", true, "3 loaded");
        assert!(h.ready());
        // Expecting it again keeps the report.
        h.expect("plugins");
        assert_eq!(h.snapshot().checks["plugins"].detail, "3 loaded");
    }

    #[test]
    fn updates_from_other_threads_are_seen() {
        let h = std::sync::Arc::new(Health::new());
        h.expect("worker");
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let h = h.clone();
                std::thread::spawn(move || h.set(if i == 0 { "worker" } else { "other" }, true, format!("{i}")))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(h.ready());
        assert_eq!(h.snapshot().checks.len(), 2);
    }
}
