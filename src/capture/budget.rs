//! The memory capture may use at once: request bodies as they arrive, and what decoding them
//! makes (decompressed text, parsed rows, the encoded batch), charged against one budget
//! (`CAPTURE_MAX_INFLIGHT_BYTES`) and given back when the request ends.
//!
//! A request that cannot get its share within [`WAIT`] is answered 503 with `Retry-After`: under
//! a flood of large bodies, memory stays within the budget and the clients are told to come back,
//! instead of the box running out of memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::CaptureError;

/// How long a request may wait for its share of the budget.
const WAIT: Duration = Duration::from_secs(1);
/// The budget is counted in KiB (a semaphore's permits are a `u32`).
const UNIT: usize = 1024;

fn units(bytes: usize) -> u32 {
    bytes.div_ceil(UNIT).min(u32::MAX as usize) as u32
}

/// The shared budget.
#[derive(Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

/// What one request holds of the budget; given back on drop.
pub struct Charge {
    budget: MemoryBudget,
    permit: Option<OwnedSemaphorePermit>,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> MemoryBudget {
        let total = units(bytes) as usize;
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// An empty charge to grow as the request goes.
    pub fn start(&self) -> Charge {
        Charge {
            budget: self.clone(),
            permit: None,
        }
    }

    /// Bytes of the budget in use now.
    pub fn in_use(&self) -> usize {
        (self.total - self.permits.available_permits()) * UNIT
    }

    /// A request whose whole charge would pass the entire budget can never be served.
    fn never_fits(&self, held: usize, bytes: usize) -> Option<CaptureError> {
        (units(held + bytes) as usize > self.total).then(|| CaptureError::OverBudget {
            budget: self.total * UNIT,
        })
    }
}

impl Charge {
    fn absorb(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
    }

    /// Bytes charged so far.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits()) * UNIT
    }

    /// Charges `bytes` more, waiting up to a second for them (from async code).
    pub async fn grow(&mut self, bytes: usize) -> Result<(), CaptureError> {
        if bytes == 0 {
            return Ok(());
        }
        if let Some(refused) = self.budget.never_fits(self.bytes(), bytes) {
            return Err(refused);
        }
        let permits = self.budget.permits.clone();
        match tokio::time::timeout(WAIT, permits.acquire_many_owned(units(bytes))).await {
            Ok(Ok(permit)) => {
                self.absorb(permit);
                Ok(())
            }
            _ => Err(CaptureError::Busy),
        }
    }

    /// Charges `bytes` more from a blocking thread (decoding), waiting up to a second.
    pub fn grow_blocking(&mut self, bytes: usize) -> Result<(), CaptureError> {
        if bytes == 0 {
            return Ok(());
        }
        if let Some(refused) = self.budget.never_fits(self.bytes(), bytes) {
            return Err(refused);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .budget
                .permits
                .clone()
                .try_acquire_many_owned(units(bytes))
            {
                Ok(permit) => {
                    self.absorb(permit);
                    return Ok(());
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return Err(CaptureError::Busy),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_are_given_back_and_an_exhausted_budget_refuses() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut first = budget.start();
        first.grow(40 * 1024).await.unwrap();
        assert_eq!(budget.in_use(), 40 * 1024);
        let mut second = budget.start();
        let started = Instant::now();
        assert!(matches!(
            second.grow(40 * 1024).await,
            Err(CaptureError::Busy)
        ));
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "it waited for room"
        );
        assert!(matches!(
            second.grow(1 << 30).await,
            Err(CaptureError::OverBudget { .. })
        ));
        drop(first);
        assert_eq!(budget.in_use(), 0);
        second.grow_blocking(40 * 1024).unwrap();
        second.grow_blocking(10 * 1024).unwrap();
        assert_eq!(second.bytes(), 50 * 1024);
    }
}
