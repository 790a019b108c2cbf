//! The one shutdown signal every long-running part watches.
//!
//! Owns: [`Shutdown`] (what a task holds) and [`ShutdownTrigger`] (what `app` keeps). While
//! running the signal holds no deadline; at shutdown it holds the instant by which draining must
//! end, so each part can finish what it holds and leave the rest durable for the next start.
//! Must never: import another module of the crate (it is the bottom layer).

use tokio::sync::watch;
use tokio::time::Instant;

/// A task's view of the shutdown signal. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Option<Instant>>,
}

/// Starts shutdown for every [`Shutdown`] made from the same [`channel`].
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<Option<Instant>>,
}

/// A trigger and the signal it drives.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(None);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Asks every part to drain and stop by `deadline`.
    pub fn drain_until(&self, deadline: Instant) {
        let _ = self.tx.send(Some(deadline));
    }
}

impl Shutdown {
    /// A signal that never fires (tools and tests that run a part on its own).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(None);
        // With the sender gone, `changed` waits forever.
        drop(tx);
        Shutdown { rx }
    }

    /// `None` while running; the drain deadline once shutdown has begun.
    pub fn deadline(&self) -> Option<Instant> {
        *self.rx.borrow()
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.deadline().is_some()
    }

    /// True once the drain deadline has passed: stop now, leave the rest for the next start.
    pub fn deadline_passed(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Resolves when the signal changes (shutdown begins). Never resolves if the trigger is gone
    /// without having fired.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
