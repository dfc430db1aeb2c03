//! Requests in flight to an upstream, and the queue where requests wait when
//! every backend they may use is at its `max_connections` (HAProxy's `maxconn`
//! and `maxqueue`, with `timeout queue`).
//!
//! One [`Load`] per upstream name, shared by every worker thread and kept
//! across reloads. A request counts on its backend for as long as its
//! [`InFlight`] guard lives (to the end of the response body, or of a
//! WebSocket tunnel). When a guard drops and requests are waiting, the freed
//! place is handed out at once, in the thread that freed it: the waiters are
//! asked in order of arrival, each through its own upstream's balance
//! ([`Admit`]), so the first one that can use a backend with room gets it,
//! already counted there. A newcomer never overtakes: while anyone waits, it
//! joins the back of the queue.
//!
//! The queue is a mutex over a list: it is touched only by requests that
//! wait and by the releases that serve them; a request that finds room never
//! takes the lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backend::BackendState;
use crate::failure::ProxyError;

/// What a request asks of its upstream's balance.
#[derive(Clone, Copy, Debug, Default)]
pub struct Want<'a> {
    /// Its consistent-hashing key: it waits for that key's backend.
    pub key: Option<u64>,
    /// The backend its sticky cookie names, if usable: it waits for that one.
    pub pinned: Option<usize>,
    /// Backends this request was already sent to, and failed on.
    pub tried: &'a [usize],
}

impl Want<'_> {
    /// Whether only one backend will do for it (a key or a pin), so that
    /// another waiter's finding every backend full says nothing of it.
    fn is_particular(&self) -> bool {
        self.key.is_some() || self.pinned.is_some()
    }
}

/// The answer to a request for a backend.
#[derive(Debug)]
pub enum Admission {
    /// This backend (an index into the upstream's), counted in flight.
    Now(usize, InFlight),
    /// A usable backend would do, but none of those it may use has room.
    Full,
    /// No backend is usable at all: waiting would not help.
    Nowhere,
}

/// An upstream's balance, as the queue asks it on a waiter's behalf.
pub trait Admit: Send + Sync {
    fn admit(&self, want: &Want<'_>) -> Admission;
}

/// Why a request left the queue without a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// `queue.size` requests were waiting already.
    Full,
    /// It waited `queue.timeout`.
    Timeout,
    /// Every backend became unusable while it waited.
    Nowhere,
}

impl From<Rejected> for ProxyError {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::Full => ProxyError::QueueFull,
            Rejected::Timeout => ProxyError::QueueTimeout,
            Rejected::Nowhere => ProxyError::NoBackend,
        }
    }
}

type Grant = Result<(usize, InFlight), Rejected>;

struct Waiter {
    id: u64,
    upstream: Arc<dyn Admit>,
    key: Option<u64>,
    pinned: Option<usize>,
    tried: Box<[usize]>,
    grant: oneshot::Sender<Grant>,
}

impl Waiter {
    fn want(&self) -> Want<'_> {
        Want {
            key: self.key,
            pinned: self.pinned,
            tried: &self.tried,
        }
    }
}

#[derive(Default)]
struct Waiters {
    list: VecDeque<Waiter>,
    next_id: u64,
}

/// One upstream's requests in flight and its queue.
#[derive(Default)]
pub struct Load {
    in_flight: AtomicUsize,
    /// `waiters.list.len()`, readable without the lock.
    waiting: AtomicUsize,
    waiters: Mutex<Waiters>,
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Load")
            .field("in_flight", &self.in_flight())
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl Load {
    /// Requests in flight to the upstream's backends.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests in the queue.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // Nothing panics with the lock held but a bug in `Admit`; the list stays whole.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A backend for `want` now, unless others are waiting: then, as when
    /// every backend it may use is full, it must queue (`Full`).
    #[inline]
    pub fn admit_now<A: Admit + ?Sized>(&self, upstream: &A, want: &Want<'_>) -> Admission {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return Admission::Full;
        }
        upstream.admit(want)
    }

    /// Waits at the back of the queue for a backend of `upstream` that `want`
    /// may use, at most `timeout`, unless `size` requests wait already. The
    /// request leaves the queue if this future is dropped (its client went away).
    pub async fn wait(
        &self,
        upstream: Arc<dyn Admit>,
        want: &Want<'_>,
        size: usize,
        timeout: Duration,
    ) -> Result<(usize, InFlight), Rejected> {
        let (grant, mut granted) = oneshot::channel();
        let id = {
            let mut waiters = self.lock();
            if waiters.list.len() >= size {
                return Err(Rejected::Full);
            }
            waiters.next_id += 1;
            let id = waiters.next_id;
            waiters.list.push_back(Waiter {
                id,
                upstream,
                key: want.key,
                pinned: want.pinned,
                tried: want.tried.into(),
                grant,
            });
            self.waiting.store(waiters.list.len(), Ordering::SeqCst);
            // A place freed between the caller's try and the push above was
            // handed to nobody: the push was not yet seen.
            self.dispatch_locked(&mut waiters);
            id
        };
        // Declared after `granted`, so dropped before it: the waiter leaves
        // the list under the lock, and only then may a grant in the channel
        // be dropped (its release takes the lock).
        let mut leave = Leave {
            load: self,
            id: Some(id),
        };
        match tokio::time::timeout(timeout, &mut granted).await {
            // The dispatcher took it off the list to send this.
            Ok(grant) => {
                leave.id = None;
                grant.unwrap_or(Err(Rejected::Timeout))
            }
            Err(_) => {
                self.leave(id);
                leave.id = None;
                // A grant made before the waiter left is kept, not wasted.
                granted.try_recv().unwrap_or(Err(Rejected::Timeout))
            }
        }
    }

    fn leave(&self, id: u64) {
        let mut waiters = self.lock();
        if let Some(at) = waiters.list.iter().position(|w| w.id == id) {
            waiters.list.remove(at);
            self.waiting.store(waiters.list.len(), Ordering::SeqCst);
        }
    }

    /// Hands places with room to waiters, in order of arrival. Called when a
    /// request ends, when a backend comes back into rotation, and after a
    /// reload (its limits may have risen).
    #[inline]
    pub fn dispatch(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch_now();
        }
    }

    #[cold]
    fn dispatch_now(&self) {
        let mut waiters = self.lock();
        self.dispatch_locked(&mut waiters);
    }

    fn dispatch_locked(&self, waiters: &mut Waiters) {
        // Upstreams (snapshots) for which a waiter that any backend would do
        // found none with room: the next such waiters would find the same.
        let mut full: Vec<*const ()> = Vec::new();
        let mut at = 0;
        while at < waiters.list.len() {
            let waiter = &waiters.list[at];
            let upstream = Arc::as_ptr(&waiter.upstream) as *const ();
            if waiter.grant.is_closed() {
                waiters.list.remove(at);
                continue;
            }
            let want = waiter.want();
            if !want.is_particular() && full.contains(&upstream) {
                at += 1;
                continue;
            }
            let grant = match waiter.upstream.admit(&want) {
                Admission::Full => {
                    if !want.is_particular() {
                        full.push(upstream);
                    }
                    at += 1;
                    continue;
                }
                Admission::Now(backend, in_flight) => Ok((backend, in_flight)),
                Admission::Nowhere => Err(Rejected::Nowhere),
            };
            let waiter = waiters.list.remove(at).expect("`at` is within the list");
            if let Err(Ok((_, in_flight))) = waiter.grant.send(grant) {
                // Its client left just now: the place goes to the next.
                in_flight.cancel();
            }
        }
        self.waiting.store(waiters.list.len(), Ordering::SeqCst);
    }
}

/// Takes a waiter off the list if its request ends while it waits (its
/// client left); `None` once it is off.
struct Leave<'a> {
    load: &'a Load,
    id: Option<u64>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.load.leave(id);
        }
    }
}

/// Keeps one request counted on its backend and its upstream. It rides with
/// the response body, so the count drops when the body ends or the client
/// goes away, not when the headers arrive; and then the place goes to the
/// first waiter that can use it.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<BackendState>,
    load: Arc<Load>,
}

impl InFlight {
    /// Counts a request on `backend`, whatever its limit.
    pub fn begin(backend: &Arc<BackendState>, load: &Arc<Load>) -> InFlight {
        backend.acquire();
        InFlight::counted(backend, load)
    }

    /// Counts a request on `backend` if it is below its limit.
    pub fn try_begin(backend: &Arc<BackendState>, load: &Arc<Load>) -> Option<InFlight> {
        backend
            .try_acquire()
            .then(|| InFlight::counted(backend, load))
    }

    fn counted(backend: &Arc<BackendState>, load: &Arc<Load>) -> InFlight {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            backend: backend.clone(),
            load: load.clone(),
        }
    }

    fn uncount(&self) {
        self.backend.release();
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ends the count without handing the place on: for the dispatcher,
    /// which holds the queue's lock and goes on handing out places itself.
    fn cancel(self) {
        self.uncount();
        std::mem::forget(self);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.uncount();
        self.load.dispatch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: Want<'static> = Want {
        key: None,
        pinned: None,
        tried: &[],
    };

    /// Polls `f` once: whether it is still waiting.
    fn pending<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(f).poll(&mut cx).is_pending()
    }

    /// One backend of `limit` places; any request will do with it.
    struct One {
        backend: Arc<BackendState>,
        load: Arc<Load>,
    }

    impl Admit for One {
        fn admit(&self, _: &Want<'_>) -> Admission {
            if !self.backend.is_usable() {
                return Admission::Nowhere;
            }
            match InFlight::try_begin(&self.backend, &self.load) {
                Some(f) => Admission::Now(0, f),
                None => Admission::Full,
            }
        }
    }

    fn one(limit: usize) -> Arc<One> {
        let backend = Arc::new(BackendState::default());
        backend.set_limit(Some(limit));
        Arc::new(One {
            backend,
            load: Arc::default(),
        })
    }

    #[tokio::test]
    async fn a_release_hands_the_place_to_the_first_waiter() {
        let up = one(1);
        let Admission::Now(_, first) = up.load.admit_now(&*up, &ANY) else {
            panic!("room for one")
        };
        assert!(matches!(up.load.admit_now(&*up, &ANY), Admission::Full));
        let second = up.load.wait(up.clone(), &ANY, 10, Duration::from_secs(5));
        let third = up.load.wait(up.clone(), &ANY, 10, Duration::from_secs(5));
        let (mut second, mut third) = (Box::pin(second), Box::pin(third));
        // Both join the queue (polled once each), in this order.
        assert!(pending(&mut second));
        assert!(pending(&mut third));
        assert_eq!(up.load.waiting(), 2);
        drop(first);
        let (_, in_flight) = second.await.expect("the first waiter is served first");
        assert_eq!((up.backend.active_requests(), up.load.waiting()), (1, 1));
        assert!(pending(&mut third));
        drop(in_flight);
        assert!(third.await.is_ok());
        // Every place was given back.
        assert_eq!(up.backend.active_requests(), 0);
    }

    #[tokio::test]
    async fn a_newcomer_does_not_take_a_place_freed_for_a_waiter() {
        let up = one(1);
        let Admission::Now(_, first) = up.load.admit_now(&*up, &ANY) else {
            panic!("room for one")
        };
        let mut waiter = Box::pin(up.load.wait(up.clone(), &ANY, 10, Duration::from_secs(5)));
        assert!(pending(&mut waiter));
        // The place is free, and the release has not yet handed it on.
        first.cancel();
        assert!(up.backend.has_room());
        assert!(matches!(up.load.admit_now(&*up, &ANY), Admission::Full));
        up.load.dispatch();
        assert!(waiter.await.is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_and_a_timeout_are_rejections_and_a_leaver_is_forgotten() {
        let up = one(1);
        let Admission::Now(_, _held) = up.admit(&ANY) else {
            panic!("room for one")
        };
        let mut waiting = Box::pin(up.load.wait(up.clone(), &ANY, 1, Duration::from_secs(5)));
        assert!(pending(&mut waiting));
        let full = up.load.wait(up.clone(), &ANY, 1, Duration::from_secs(5));
        assert_eq!(full.await.err(), Some(Rejected::Full));
        // The client of the waiting request goes away.
        drop(waiting);
        assert_eq!(up.load.waiting(), 0);
        let timed_out = up.load.wait(up.clone(), &ANY, 1, Duration::from_millis(20));
        assert_eq!(timed_out.await.err(), Some(Rejected::Timeout));
        assert_eq!(up.load.waiting(), 0);
    }

    #[tokio::test]
    async fn waiters_are_told_when_no_backend_is_usable() {
        let up = one(1);
        let Admission::Now(_, held) = up.admit(&ANY) else {
            panic!("room for one")
        };
        let mut waiting = Box::pin(up.load.wait(up.clone(), &ANY, 1, Duration::from_secs(5)));
        assert!(pending(&mut waiting));
        up.backend.set_healthy(false);
        drop(held);
        assert_eq!(waiting.await.err(), Some(Rejected::Nowhere));
    }
}
