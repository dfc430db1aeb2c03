//! A limit on the connections being opened to one backend at once, with the
//! requests beyond it waiting in arrival order.
//!
//! Without it, a burst of requests that finds the pool empty (a cold start, an
//! HTTP/2 client's batch of streams) opens a connection per request, all at
//! once. An event loop runs ready tasks in turn, so every request of the burst
//! starts its connect before any gets its reply, and the first reply waits for
//! hundreds of connects, most of them needless: the first exchanges give their
//! connections back within a moment. Here at most `limit` connects run at once;
//! a request beyond that waits for whichever comes first: a connection another
//! request gives back, or a turn to open one. Both go to the longest waiting
//! request, so a request that arrives later cannot overtake one that waits.
//!
//! Free of I/O: the pool decides what a connection is and how long to wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

pub struct ConnectQueue<C> {
    limit: usize,
    /// How many wait, read without the lock so that a connection given back
    /// when nobody waits (nearly always) costs one load.
    waiting: AtomicUsize,
    state: Mutex<State<C>>,
}

struct State<C> {
    /// Turns taken: connects running, or turns on their way to a waiter.
    opening: usize,
    waiters: VecDeque<oneshot::Sender<Turn<C>>>,
}

/// What a request that found no idle connection gets.
pub enum Entry<C> {
    /// A turn to open a connection, at once.
    Open(Slot<C>),
    /// A place in the queue; gone once dropped.
    Wait(oneshot::Receiver<Turn<C>>),
}

/// What a waiting request is given.
pub enum Turn<C> {
    /// A connection another request has finished with.
    Conn(C),
    /// A turn to open a connection.
    Open(Slot<C>),
}

/// A turn to open a connection: dropping it, once the connect is over (done or
/// failed), passes the turn to the longest waiting request.
pub struct Slot<C> {
    /// None once the turn has been passed on.
    queue: Option<Arc<ConnectQueue<C>>>,
}

impl<C> ConnectQueue<C> {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ConnectQueue {
            limit: limit.max(1),
            waiting: AtomicUsize::new(0),
            state: Mutex::new(State {
                opening: 0,
                waiters: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A turn to open a connection if one is free, else a place in the queue.
    pub fn enter(self: &Arc<Self>) -> Entry<C> {
        let mut state = self.lock();
        if state.opening < self.limit {
            state.opening += 1;
            return Entry::Open(Slot {
                queue: Some(self.clone()),
            });
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(tx);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Entry::Wait(rx)
    }

    /// Hands `conn` to the longest waiting request, or gives it back when none
    /// waits.
    ///
    /// Read without the lock, a waiter that has just entered may be missed and
    /// the connection go idle. It waits no longer than the next connect to end:
    /// it waits only while every turn is taken, and a turn's next holder looks
    /// for an idle connection before it opens one.
    pub fn offer(&self, conn: C) -> Option<C> {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return Some(conn);
        }
        match self.hand_over(Turn::Conn(conn)) {
            Some(Turn::Conn(conn)) => Some(conn),
            _ => None,
        }
    }

    /// Gives `turn` to the longest waiting request still there; gives it back
    /// when there is none.
    fn hand_over(&self, mut turn: Turn<C>) -> Option<Turn<C>> {
        let mut state = self.lock();
        while let Some(waiter) = state.waiters.pop_front() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            match waiter.send(turn) {
                Ok(()) => return None,
                // It gave up waiting.
                Err(back) => turn = back,
            }
        }
        drop(state);
        Some(turn)
    }

    /// A turn is over: it goes to the longest waiting request, or is freed.
    fn pass_on(self: Arc<Self>) {
        let turn = Turn::Open(Slot {
            queue: Some(self.clone()),
        });
        if let Some(Turn::Open(mut unused)) = self.hand_over(turn) {
            // Nobody took it: freed here rather than passed on again by its drop.
            unused.queue = None;
            self.lock().opening -= 1;
        }
    }
}

impl<C> Drop for Slot<C> {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.pass_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open<C>(entry: Entry<C>) -> Slot<C> {
        match entry {
            Entry::Open(slot) => slot,
            Entry::Wait(_) => panic!("waits, where a turn was free"),
        }
    }

    fn waiting<C>(entry: Entry<C>) -> oneshot::Receiver<Turn<C>> {
        match entry {
            Entry::Wait(rx) => rx,
            Entry::Open(_) => panic!("got a turn beyond the limit"),
        }
    }

    fn opening<C>(queue: &ConnectQueue<C>) -> usize {
        queue.lock().opening
    }

    #[test]
    fn at_most_limit_turns_and_each_freed_turn_goes_to_the_oldest_waiter() {
        let queue = ConnectQueue::<u32>::new(2);
        let first = open(queue.enter());
        let second = open(queue.enter());
        let mut a = waiting(queue.enter());
        let mut b = waiting(queue.enter());
        drop(first);
        let a_turn = match a.try_recv() {
            Ok(Turn::Open(slot)) => slot,
            _ => panic!("the oldest waiter did not get the freed turn"),
        };
        assert!(b.try_recv().is_err(), "a turn went to two waiters");
        assert_eq!(opening(&queue), 2);
        drop(second);
        assert!(matches!(b.try_recv(), Ok(Turn::Open(_))));
        drop(a_turn);
        // b's turn was dropped unused at once; with a's, every turn is free again.
        assert_eq!(opening(&queue), 0);
        drop(open(queue.enter()));
    }

    #[test]
    fn a_connection_given_back_goes_to_the_oldest_waiter_or_back_to_the_pool() {
        let queue = ConnectQueue::<u32>::new(1);
        assert_eq!(queue.offer(7), Some(7), "nobody waits: it goes idle");
        let _turn = open(queue.enter());
        let mut a = waiting(queue.enter());
        let mut b = waiting(queue.enter());
        assert_eq!(queue.offer(1), None);
        assert_eq!(queue.offer(2), None);
        assert!(matches!(a.try_recv(), Ok(Turn::Conn(1))));
        assert!(matches!(b.try_recv(), Ok(Turn::Conn(2))));
        assert_eq!(queue.offer(3), Some(3));
    }

    #[test]
    fn waiters_that_gave_up_are_skipped_and_their_turns_not_lost() {
        let queue = ConnectQueue::<u32>::new(1);
        let turn = open(queue.enter());
        drop(waiting(queue.enter()));
        let mut kept = waiting(queue.enter());
        assert_eq!(queue.offer(5), None, "skipped the one that gave up");
        assert!(matches!(kept.try_recv(), Ok(Turn::Conn(5))));
        // A turn handed to a waiter that then leaves without taking it.
        let late = waiting(queue.enter());
        drop(turn);
        assert_eq!(opening(&queue), 1, "the turn is on its way to the waiter");
        drop(late);
        assert_eq!(opening(&queue), 0);
        assert_eq!(queue.waiting.load(Ordering::Relaxed), 0);
    }
}
