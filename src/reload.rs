//! Configuration reload on SIGHUP: the settings a running daemon can change for new sessions
//! ([`Live`]: `policy.*`, most of `limits.*`, `log.level`), and the rest, which belong to one
//! run (listeners, mode, port range, table and mark settings) and need a restart.
//!
//! A reload re-reads the file the daemon started with, validates it as `check-config` does,
//! and swaps the [`Settings`] that each new session takes a snapshot of; a session already open
//! keeps the snapshot it started with. A file that does not load changes nothing. Each changed
//! key is logged, either as applied or as waiting for a restart (those keep their running value).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::config::{Config, LimitsConfig, PolicyConfig};
use crate::logging::LogHandle;
use crate::registry::Registry;

/// Keys a reload applies to new sessions; every other key needs a restart.
/// `limits.client_prefix_v6` is not among them: the sessions open are counted by it.
const RELOADABLE: [&str; 9] = [
    "policy.",
    "limits.max_sessions",
    "limits.max_sessions_per_client",
    "limits.idle_timeout_secs",
    "limits.max_pinholes_per_session",
    "limits.max_windows_per_client",
    "limits.shutdown_grace_secs",
    "limits.handover_grace_secs",
    "log.level",
];

/// Whether a changed `key` (dotted, as [`changed_keys`] names it) can take effect without a
/// restart.
pub fn reloadable(key: &str) -> bool {
    RELOADABLE.iter().any(|r| match r.strip_suffix('.') {
        Some(section) => key.starts_with(r) || key == section,
        None => key == *r,
    })
}

/// What each new session is set up with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[policy]`; shared by every session started under it.
    pub policy: Arc<PolicyConfig>,
    /// `[limits]`.
    pub limits: LimitsConfig,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        Settings {
            policy: Arc::new(config.policy.clone()),
            limits: config.limits.clone(),
        }
    }
}

/// The settings in force now; a reload replaces them as a whole.
#[derive(Debug)]
pub struct Live(RwLock<Arc<Settings>>);

impl Live {
    /// The settings of `config`.
    pub fn new(config: &Config) -> Live {
        Live(RwLock::new(Arc::new(Settings::of(config))))
    }

    /// A snapshot: it does not change when a reload swaps the settings.
    pub fn get(&self) -> Arc<Settings> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, settings: Settings) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(settings);
    }
}

/// The dotted keys whose values differ between `old` and `new` (`policy.read_only`,
/// `proxy.listen`); a list counts as one key.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    fn walk(prefix: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
        match (old, new) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                let null = serde_json::Value::Null;
                for key in keys {
                    let path = match prefix {
                        "" => key.clone(),
                        _ => format!("{prefix}.{key}"),
                    };
                    walk(
                        &path,
                        a.get(key).unwrap_or(&null),
                        b.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            (a, b) if a != b => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk("", &old, &new, &mut out);
    out
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Changed keys now in force for new sessions.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until a restart.
    pub need_restart: Vec<String>,
}

/// Re-reads the configuration file on request.
pub struct Reloader {
    /// The file the daemon started with; `None` for the built-in default, which cannot change.
    path: Option<PathBuf>,
    /// The configuration in force: the start-up one with every reload's applied keys.
    running: Mutex<Config>,
    log: LogHandle,
}

impl Reloader {
    /// A reloader for a daemon started with `config` from `path`.
    pub fn new(path: Option<PathBuf>, config: &Config, log: LogHandle) -> Reloader {
        Reloader {
            path,
            running: Mutex::new(config.clone()),
            log,
        }
    }

    /// Reload the file: apply what can change to `live` and `registry`, log every changed key,
    /// and keep everything as it is if the file does not load.
    pub fn reload(&self, live: &Live, registry: &Registry) {
        let Some(path) = &self.path else {
            tracing::warn!(
                "SIGHUP: ftp-alg runs with the built-in default configuration; there is no file to reload"
            );
            return;
        };
        let new = match Config::load(path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration not reloaded; the running configuration stays in force");
                return;
            }
        };
        let outcome = self.apply(new, live, registry);
        let upgraded = crate::handover::binary_replaced();
        if !outcome.need_restart.is_empty() || upgraded {
            // What a reload cannot apply, a new process can: it takes the listeners over and
            // this one serves its sessions to their end.
            match crate::handover::spawn_successor(path) {
                Ok(pid) => tracing::warn!(
                    successor = pid,
                    keys = %outcome.need_restart.join(", "),
                    upgraded,
                    "SIGHUP: handing over to a new process for changes a reload cannot apply"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: cannot start a new process to take over")
                }
            }
        }
        if outcome.applied.is_empty() && outcome.need_restart.is_empty() {
            tracing::info!(file = %path.display(), "SIGHUP: configuration reloaded; nothing changed");
            return;
        }
        if !outcome.applied.is_empty() {
            tracing::info!(
                file = %path.display(),
                keys = %outcome.applied.join(", "),
                "SIGHUP: configuration reloaded; new sessions use the changed keys, open sessions keep theirs"
            );
        }
        if !outcome.need_restart.is_empty() {
            tracing::warn!(
                file = %path.display(),
                keys = %outcome.need_restart.join(", "),
                "SIGHUP: these changed keys need a new process; this one keeps their running values until it has handed over"
            );
        }
    }

    /// Apply the reloadable keys of `new`; what changed, and what waits for a restart.
    pub fn apply(&self, new: Config, live: &Live, registry: &Registry) -> Outcome {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let (applied, need_restart): (Vec<String>, Vec<String>) = changed_keys(&running, &new)
            .into_iter()
            .partition(|key| reloadable(key));
        if applied.is_empty() {
            return Outcome {
                applied,
                need_restart,
            };
        }
        let l = &new.limits;
        let next_limits = crate::config::LimitsConfig {
            client_prefix_v6: running.limits.client_prefix_v6,
            ..l.clone()
        };
        if applied.iter().any(|k| k == "log.level") {
            match self.log.set_level(&new.log.level) {
                Ok(filter) => tracing::info!(filter = %filter, "log filter in force"),
                Err(e) => tracing::warn!(error = %e, "log.level not applied"),
            }
            running.log.level = new.log.level.clone();
        }
        registry.set_limits(
            next_limits.max_sessions,
            next_limits.max_sessions_per_client,
        );
        running.policy = new.policy;
        running.limits = next_limits;
        live.set(Settings::of(&running));
        Outcome {
            applied,
            need_restart,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;
    use std::path::Path;

    const BASE: &str = r#"
[proxy]
mode = "reverse"
listen = ["127.0.0.1:2121"]
upstream = "127.0.0.1:21"
max_line = {MAX_LINE}
"#;

    fn config(extra: &str) -> Config {
        config_with(512, extra)
    }

    fn config_with(max_line: usize, extra: &str) -> Config {
        let base = BASE.replace("{MAX_LINE}", &max_line.to_string());
        Config::from_toml(&format!("{base}{extra}"), Path::new("test.toml")).unwrap()
    }

    #[test]
    fn keys_are_sorted_into_applied_and_needing_a_restart() {
        let old = config("");
        let new = config(
            "[policy]\nread_only = true\n[limits]\nmax_sessions = 500\nclient_prefix_v6 = 56\n\
             [pinholes]\nport_min = 62000\n[log]\nformat = \"json\"\n",
        );
        let keys = changed_keys(&old, &new);
        assert_eq!(
            keys,
            [
                "limits.client_prefix_v6",
                "limits.max_sessions",
                "log.format",
                "pinholes.port_min",
                "policy.read_only"
            ]
        );
        let (applied, restart): (Vec<_>, Vec<_>) = keys.iter().partition(|k| reloadable(k));
        assert_eq!(applied, ["limits.max_sessions", "policy.read_only"]);
        assert_eq!(
            restart,
            ["limits.client_prefix_v6", "log.format", "pinholes.port_min"]
        );
    }

    #[test]
    fn a_reload_swaps_the_settings_and_old_snapshots_stay() {
        let old = config("");
        let live = Live::new(&old);
        let registry = Registry::new(1000, 16);
        let log = crate::logging::init(LogFormat::Human, "info");
        let reloader = Reloader::new(None, &old, log);
        let before = live.get();
        let outcome = reloader.apply(
            config_with(600, "[policy]\nread_only = true\n"),
            &live,
            &registry,
        );
        assert_eq!(outcome.applied, ["policy.read_only"]);
        assert_eq!(outcome.need_restart, ["proxy.max_line"]);
        assert!(live.get().policy.read_only);
        assert!(!before.policy.read_only, "an open session keeps its policy");
        // The restart-only key is still reported next time: it is still not in force.
        let again = reloader.apply(
            config_with(600, "[policy]\nread_only = true\n"),
            &live,
            &registry,
        );
        assert_eq!(again.applied, Vec::<String>::new());
        assert_eq!(again.need_restart, ["proxy.max_line"]);
    }
}
