//! What every long-running subcommand (`proxy`, `control`) sets up the
//! same way: JSON logs on stderr and the stop signals.

use anyhow::Context;

/// JSON log lines on stderr, filtered by `filter` (tracing syntax).
pub(crate) fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("invalid --log filter")?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// The signals that stop a long-running command: SIGTERM (an
/// orchestrator) and SIGINT (Ctrl-C), each taken over for the process's
/// lifetime, so that a second one can cut a drain short.
pub(crate) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

/// A signal that stops the process.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    Terminate,
    Interrupt,
}

impl Stop {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stop::Terminate => "SIGTERM",
            Stop::Interrupt => "SIGINT",
        }
    }

    /// The exit status after a second signal: 128 + the signal's number,
    /// as a shell reports a process that signal ended.
    pub(crate) fn exit_status(self) -> u8 {
        match self {
            Stop::Terminate => 128 + 15,
            Stop::Interrupt => 128 + 2,
        }
    }
}

impl Signals {
    pub(crate) fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next stop signal.
    pub(crate) async fn next(&mut self) -> Stop {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Stop::Terminate,
                _ = self.int.recv() => Stop::Interrupt,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Stop::Interrupt
        }
    }
}
