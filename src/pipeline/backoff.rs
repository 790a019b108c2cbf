//! Exponential backoff between the tries of a failing pipeline step.

use std::time::Duration;

use super::status::PipelineStatus;
use crate::shutdown::Shutdown;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: RETRY_MIN }
    }
}

impl Backoff {
    pub(super) fn reset(&mut self) {
        self.next = RETRY_MIN;
    }

    /// Reports the failure (log and `/_ready`) and waits before the next try; the start of
    /// shutdown cuts the wait short.
    pub(super) async fn wait(
        &mut self,
        status: &PipelineStatus,
        what: &str,
        error: impl std::fmt::Display,
        shutdown: &mut Shutdown,
    ) {
        tracing::error!(error = %error, retry_in_ms = self.next.as_millis() as u64, "{what} failed; retrying");
        status.set_error(Some(error.to_string()));
        // Waiting out a failure is the loop going round, not a stall.
        status.beat();
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = shutdown.changed() => {}
        }
        self.next = (self.next * 2).min(RETRY_MAX);
    }
}
