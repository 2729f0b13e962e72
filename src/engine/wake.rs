//! The way back to Prosody's event loop.
//!
//! Each module instance owns a [`Mailbox`]: a queue of finished work and an eventfd that the
//! loop watches (`net.server.watchfd`). Worker threads push a [`Completion`] and bump the
//! eventfd; the loop wakes and calls [`Mailbox::drain`], which reads the eventfd (the poller is
//! level-triggered, so an unread eventfd would spin the loop) and takes everything queued.
//! [`Progress`] is the writer's side: it moves the watermarks and tells every mailbox.
//!
//! Owns no Lua state and no database.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use minidom::Element;

use crate::protocol::tree::Tree;
use crate::protocol::StanzaError;

/// Severity of a log line, mapped to Prosody's levels by the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// The answer to a request: stanzas to send, then the reply to the iq.
#[derive(Debug)]
pub struct Answer {
    /// Result messages, in the order to send them.
    pub messages: Vec<Tree>,
    /// The child of the iq result: `<fin>` for a query, `<metadata>` for a metadata request.
    pub payload: Element,
    /// The chronologically newest archive id among `messages`, as clients see it.
    pub last_id: Option<String>,
    /// The same message's own archive id (differs for imported messages), for client marks.
    pub mark_id: Option<String>,
}

/// Work finished off the loop, for the loop to act on.
#[derive(Debug)]
pub enum Completion {
    /// A request finished: its answer, or an error for the client.
    Query {
        ticket: u64,
        result: Result<Answer, StanzaError>,
        /// From the request's arrival to this answer.
        elapsed: Duration,
    },
    /// An expiry run finished: how many messages it removed, or why it stopped.
    Expired {
        ticket: u64,
        result: Result<u64, String>,
    },
    /// Something for Prosody's log.
    Log { level: Level, message: String },
}

/// What [`Mailbox::drain`] hands the loop.
#[derive(Debug, Default)]
pub struct Drained {
    /// Messages with ids up to this value may be delivered (0: none yet).
    pub released: u64,
    pub completions: Vec<Completion>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Completion>,
    released: u64,
}

/// One Lua watcher's inbox: its completions, its copy of the `released` watermark, and the
/// eventfd that wakes it. Each module instance (one per VirtualHost) has its own.
#[derive(Debug)]
pub struct Mailbox {
    fd: OwnedFd,
    state: Mutex<State>,
    /// Queries asked through this mailbox and not yet answered.
    in_flight: AtomicUsize,
}

impl Mailbox {
    pub fn new(released: u64) -> io::Result<Mailbox> {
        // SAFETY: eventfd takes no pointers; a negative return is an error.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Mailbox {
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            state: Mutex::new(State {
                queue: VecDeque::new(),
                released,
            }),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// The descriptor for `net.server.watchfd`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the eventfd readable, so the loop calls [`Mailbox::drain`] on its next turn even
    /// when nothing else is ready (the shim sends a long answer a chunk per turn this way).
    pub fn poke(&self) {
        self.wake();
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN) already means
        // "readable", so the result can be ignored.
        unsafe {
            libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Queues a completion and wakes the loop.
    pub fn push(&self, completion: Completion) {
        let answers_query = matches!(completion, Completion::Query { .. });
        self.state.lock().queue.push_back(completion);
        if answers_query {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.wake();
    }

    /// Counts a query whose answer will come to this mailbox.
    pub fn expect_answer(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes back [`Mailbox::expect_answer`] for a query that was not queued after all.
    pub fn answer_not_coming(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Blocks until every query asked through this mailbox is answered, or `timeout` passes.
    /// Returns whether none is left.
    pub fn wait_answered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Queues a log line for Prosody's log.
    pub fn log(&self, level: Level, message: impl Into<String>) {
        self.push(Completion::Log {
            level,
            message: message.into(),
        });
    }

    fn release(&self, id: u64) {
        let mut state = self.state.lock();
        if id > state.released {
            state.released = id;
            drop(state);
            self.wake();
        }
    }

    /// On the loop: resets the eventfd and takes everything queued.
    pub fn drain(&self) -> Drained {
        let mut counter: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64. EAGAIN (nothing to read) is fine.
        unsafe {
            libc::read(self.fd.as_raw_fd(), (&mut counter as *mut u64).cast(), 8);
        }
        let mut state = self.state.lock();
        Drained {
            released: state.released,
            completions: state.queue.drain(..).collect(),
        }
    }
}

/// What [`Progress::wait_for_query`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Yes,
    /// The writer is failing: the rows wait for the database to come back.
    NotWhileFailing,
    /// The timeout passed with the writer still working (a slow database).
    NotYet,
}

#[derive(Debug, Default)]
struct Marks {
    released: u64,
    committed: u64,
    /// The newest id handed to the writer.
    handed_out: u64,
    /// The writer's last commit failed and it is retrying.
    failing: bool,
}

/// The writer's progress, shared by every mailbox: `released` (messages up to this id may be
/// delivered) and `committed` (rows up to this id are in the database), with a condition
/// variable that query workers wait on for read-your-writes.
#[derive(Debug, Default)]
pub struct Progress {
    marks: Mutex<Marks>,
    committed_changed: Condvar,
    mailboxes: Mutex<Vec<Weak<Mailbox>>>,
}

impl Progress {
    /// A new mailbox that hears about the writer's progress from now on.
    pub fn subscribe(&self) -> io::Result<Arc<Mailbox>> {
        let released = self.marks.lock().released;
        let mailbox = Arc::new(Mailbox::new(released)?);
        let mut boxes = self.mailboxes.lock();
        boxes.retain(|m| m.strong_count() > 0);
        boxes.push(Arc::downgrade(&mailbox));
        Ok(mailbox)
    }

    /// The writer moved: rows up to `id` may be delivered; if `committed`, they are also in
    /// the database (otherwise the writer is retrying them).
    pub fn advance(&self, id: u64, committed: bool) {
        {
            let mut marks = self.marks.lock();
            marks.released = marks.released.max(id);
            if committed {
                marks.committed = marks.committed.max(id);
            }
        }
        if committed {
            self.committed_changed.notify_all();
        }
        for mailbox in self.mailboxes.lock().iter().filter_map(Weak::upgrade) {
            mailbox.release(id);
        }
    }

    /// The engine handed row `id` to the writer. While the writer is failing, the row's
    /// delivery is released at once: it would otherwise wait for the database to come back.
    pub fn handed_out(&self, id: u64) {
        let failing = {
            let mut marks = self.marks.lock();
            marks.handed_out = marks.handed_out.max(id);
            marks.failing
        };
        if failing {
            self.advance(id, false);
        }
    }

    /// The writer's commits fail (`true`) or work again (`false`). When they start failing,
    /// every row handed out so far is released, and [`Progress::handed_out`] releases later
    /// ones at once until they work again. Both sides take the same lock, so no row falls
    /// between them (handed out just before the flag is set, and so never released).
    pub fn set_failing(&self, failing: bool) {
        let handed_out = {
            let mut marks = self.marks.lock();
            marks.failing = failing;
            marks.handed_out
        };
        if failing {
            // Queries waiting for their rows stop waiting (see `wait_committed`).
            self.committed_changed.notify_all();
            self.advance(handed_out, false);
        }
    }

    /// A log line from a thread that serves every host: it goes to the first live mailbox.
    pub fn log(&self, level: Level, message: impl Into<String>) {
        if let Some(mailbox) = self.mailboxes.lock().iter().find_map(Weak::upgrade) {
            mailbox.log(level, message);
        }
    }

    /// Blocks until rows up to `id` are committed, or `timeout` passes. Returns whether they are.
    pub fn wait_committed(&self, id: u64, timeout: Duration) -> bool {
        self.wait(id, timeout, false) == Committed::Yes
    }

    /// For a query that must see rows up to `id`: blocks until they are committed, the writer
    /// is failing (then they will not be soon), or `timeout` passes.
    pub fn wait_for_query(&self, id: u64, timeout: Duration) -> Committed {
        self.wait(id, timeout, true)
    }

    fn wait(&self, id: u64, timeout: Duration, unless_failing: bool) -> Committed {
        let deadline = Instant::now() + timeout;
        let mut marks = self.marks.lock();
        while marks.committed < id {
            if unless_failing && marks.failing {
                return Committed::NotWhileFailing;
            }
            if self
                .committed_changed
                .wait_until(&mut marks, deadline)
                .timed_out()
            {
                return if marks.committed >= id {
                    Committed::Yes
                } else {
                    Committed::NotYet
                };
            }
        }
        Committed::Yes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn push_makes_fd_readable_and_drain_resets_it() {
        let m = Mailbox::new(0).unwrap();
        assert!(!readable(m.fd()));
        m.log(Level::Info, "a");
        m.log(Level::Info, "b");
        assert!(readable(m.fd()));
        let d = m.drain();
        assert_eq!(d.completions.len(), 2);
        assert!(
            !readable(m.fd()),
            "drain must read the eventfd or the loop spins"
        );
    }

    #[test]
    fn progress_reaches_every_mailbox_and_only_moves_forward() {
        let p = Progress::default();
        let a = p.subscribe().unwrap();
        let b = p.subscribe().unwrap();
        p.advance(10, false);
        assert_eq!(a.drain().released, 10);
        assert!(readable(b.fd()));
        assert_eq!(b.drain().released, 10);
        assert!(!p.wait_committed(10, Duration::from_millis(1)));
        p.advance(12, true);
        p.advance(5, true);
        assert_eq!(a.drain().released, 12);
        assert!(p.wait_committed(12, Duration::ZERO));
        let c = p.subscribe().unwrap();
        assert_eq!(
            c.drain().released,
            12,
            "a new mailbox starts at the current mark"
        );
    }

    #[test]
    fn logs_go_to_one_live_mailbox() {
        let p = Progress::default();
        let a = p.subscribe().unwrap();
        let b = p.subscribe().unwrap();
        drop(a);
        p.log(Level::Warn, "x");
        assert_eq!(b.drain().completions.len(), 1);
    }

    #[test]
    fn waiters_wake_when_rows_commit() {
        let p = Arc::new(Progress::default());
        let p2 = p.clone();
        let t = std::thread::spawn(move || p2.wait_committed(7, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        p.advance(7, true);
        assert!(t.join().unwrap());
    }

    #[test]
    fn while_the_writer_fails_rows_are_released_as_they_are_handed_out() {
        let p = Progress::default();
        let m = p.subscribe().unwrap();
        p.handed_out(3);
        p.handed_out(5);
        assert_eq!(m.drain().released, 0, "a working writer releases on commit");
        p.set_failing(true);
        assert_eq!(
            m.drain().released,
            5,
            "everything handed out so far is released"
        );
        p.handed_out(8);
        assert_eq!(m.drain().released, 8, "and each new row at once");
        assert!(
            !p.wait_committed(8, Duration::ZERO),
            "released is not committed"
        );
        p.set_failing(false);
        p.handed_out(9);
        assert_eq!(
            m.drain().released,
            8,
            "after recovery, rows wait for their commit again"
        );
        p.advance(9, true);
        assert_eq!(m.drain().released, 9);
    }
}
