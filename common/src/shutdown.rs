//! Graceful shutdown: resolve once on SIGTERM (what Kubernetes sends) or Ctrl-C.

use tokio::sync::watch;

/// Waits for SIGTERM or SIGINT. If the signal handlers cannot be installed the process would be
/// unstoppable by its supervisor, so this logs the reason and resolves at once (the caller then shuts
/// down) instead of hanging.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
        }
    }
}

/// A shutdown broadcast: [`Shutdown::trigger`] once, every [`Shutdown::wait`] resolves.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// Starts the shutdown; idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once [`Shutdown::trigger`] was called (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // `wait_for` only errs when the sender is gone, and we hold it.
        let _ = rx.wait_for(|&stop| stop).await;
    }

    /// Triggers the shutdown when the process receives SIGTERM or Ctrl-C.
    pub fn on_signal(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            signal().await;
            this.trigger();
        });
    }
}
