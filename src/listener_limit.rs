//! A listener's `max_connections`: client connections served at once, counted
//! across every worker. At the limit, workers stop accepting on it, so new
//! connections wait in the kernel's backlog (as with HAProxy's `maxconn`)
//! rather than being accepted and starved; each worker holds at most the one
//! connection it accepted last, unread, until a place frees.
//!
//! One per listener bind, kept across reloads; a reload changes its limit in
//! place. Only connections accepted while a limit is set are counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    /// `usize::MAX` when unlimited.
    max: AtomicUsize,
    freed: Notify,
}

impl Default for ConnectionLimit {
    fn default() -> Self {
        ConnectionLimit {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(usize::MAX),
            freed: Notify::new(),
        }
    }
}

impl ConnectionLimit {
    pub fn set_max(&self, max: Option<usize>) {
        self.max.store(max.unwrap_or(usize::MAX), Ordering::Relaxed);
        // A raised limit lets every waiting worker try again.
        self.freed.notify_waiters();
    }

    pub fn is_limited(&self) -> bool {
        self.max.load(Ordering::Relaxed) != usize::MAX
    }

    /// Connections counted open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for one connection, once there is one.
    pub async fn acquire(self: &Arc<Self>) -> Place {
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the check: a place freed after it wakes us.
            freed.as_mut().enable();
            let max = self.max.load(Ordering::Relaxed);
            let taken = self
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                });
            if taken.is_ok() {
                return Place(self.clone());
            }
            freed.await;
        }
    }
}

/// One connection's place, given back when it is dropped.
#[derive(Debug)]
pub struct Place(Arc<ConnectionLimit>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_place_is_waited_for_until_one_is_given_back_or_the_limit_rises() {
        let limit = Arc::new(ConnectionLimit::default());
        limit.set_max(Some(1));
        let first = limit.acquire().await;
        let wait = tokio::time::timeout(Duration::from_millis(20), limit.acquire());
        assert!(wait.await.is_err(), "no second place at a limit of one");
        drop(first);
        let second = limit.acquire().await;
        assert_eq!(limit.open(), 1);
        let third = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::task::yield_now().await;
        limit.set_max(Some(2));
        let third = third.await.unwrap();
        assert_eq!(limit.open(), 2);
        drop((second, third));
        assert_eq!(limit.open(), 0);
    }
}
