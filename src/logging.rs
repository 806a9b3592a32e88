//! Where log lines go and how they look: the journal when systemd connected stderr to it, else
//! stderr (colour only on a terminal, never with `NO_COLOR`), as readable lines or JSON.
//!
//! systemd sets `JOURNAL_STREAM` to the device and inode of the stream it gave the service as
//! stderr; when stderr is still that stream, events go to journald's native socket instead
//! (tracing-journald), each with its real priority (error 3, warn 4, info 6, debug and trace 7: syslog's own
//! meaning of each level) and the
//! session's span fields (`F_ID`, `F_CLIENT`, `F_SERVER`), so `journalctl -p warning` and
//! `journalctl F_CLIENT=...` work. The filter (`log.level`, or `RUST_LOG` when set) can be
//! replaced at run time by a configuration reload.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The environment variable that overrides `log.level`.
pub const RUST_LOG: &str = "RUST_LOG";

/// Where the events of this process go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// journald's native protocol.
    Journal,
    /// stderr, with ANSI colour or without.
    Stderr { colour: bool },
}

/// Changes the running filter.
pub struct LogHandle {
    filter: Option<reload::Handle<EnvFilter, Registry>>,
    sink: Sink,
}

impl LogHandle {
    /// Where events go.
    pub fn sink(&self) -> Sink {
        self.sink
    }

    /// Filter events by `level` (a `log.level` value) from now on, unless `RUST_LOG` is set;
    /// says which filter is in force.
    pub fn set_level(&self, level: &str) -> Result<String, String> {
        let (filter, text) = filter(level)?;
        if let Some(handle) = &self.filter {
            handle.reload(filter).map_err(|e| e.to_string())?;
        }
        Ok(text)
    }
}

/// The filter for `level`, unless `RUST_LOG` overrides it, and its text.
fn filter(level: &str) -> Result<(EnvFilter, String), String> {
    let text = match std::env::var(RUST_LOG) {
        Ok(env) if !env.is_empty() => env,
        _ => level.to_owned(),
    };
    EnvFilter::try_new(&text)
        .map(|f| (f, text.clone()))
        .map_err(|e| format!("log filter {text:?}: {e}"))
}

/// Whether stderr is the stream `JOURNAL_STREAM` (`device:inode`) names.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Whether stderr gets colour: a terminal, and `NO_COLOR` unset or empty (no-color.org).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Install the process's logger. An invalid `level` falls back to `info` with a warning.
pub fn init(format: LogFormat, level: &str) -> LogHandle {
    let (env_filter, problem) = match filter(level) {
        Ok((f, _)) => (f, None),
        Err(e) => (EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL), Some(e)),
    };
    let (filter_layer, handle) = reload::Layer::new(env_filter);
    let journal = match stderr_is_journal() {
        true => match tracing_journald::layer() {
            Ok(layer) => {
                let mut priorities = tracing_journald::PriorityMappings::new();
                priorities.info = tracing_journald::Priority::Informational;
                priorities.debug = tracing_journald::Priority::Debug;
                Some(
                    layer
                        .with_syslog_identifier("ftp-alg".to_owned())
                        .with_priority_mappings(priorities),
                )
            }
            Err(e) => {
                eprintln!("ftp-alg: JOURNAL_STREAM is set but journald cannot be reached ({e}); logging to stderr");
                None
            }
        },
        false => None,
    };
    let sink = match journal {
        Some(_) => Sink::Journal,
        None => Sink::Stderr { colour: colour() },
    };
    let human = matches!((sink, format), (Sink::Stderr { .. }, LogFormat::Human)).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(sink == Sink::Stderr { colour: true })
    });
    let json = matches!((sink, format), (Sink::Stderr { .. }, LogFormat::Json)).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
    });
    let installed = tracing_subscriber::registry()
        .with(filter_layer)
        .with(journal)
        .with(human)
        .with(json)
        .try_init();
    if let Some(problem) = problem {
        tracing::warn!("{problem}; logging at {}", crate::config::DEFAULT_LOG_LEVEL);
    }
    LogHandle {
        // A logger was already installed (in tests): this one's filter is not in use.
        filter: installed.is_ok().then_some(handle),
        sink,
    }
}
