//! The target's shared, bounded pool of data buffers, and the FIFO of commands waiting
//! for one.
//!
//! A command holds a data buffer only while it moves data (from the R2T, or from the
//! start of a read, until its completion has been sent), so the memory of a queue is
//! proportional to what it has in flight, not to its depth. The pool is one anonymous
//! mapping of at most the configured bytes ([`crate::buffer::Region`]: pages are faulted
//! in on first use and then reused, never returned), carved by a buddy allocator into
//! page-aligned blocks of 4 KiB to [`MAX_DATA_BYTES`]. Nothing is allocated per command:
//! the free lists are arrays sized at start-up, and the wait FIFO and each client's grant
//! list reserve their capacity when the client registers (at Connect).
//!
//! Waiting is strict FIFO across the whole target: a request is served at once only when
//! nobody is waiting; otherwise it takes a ticket, and every returned buffer is handed
//! to the oldest tickets that now fit (the buffer is granted, so a slow client cannot
//! stall the others by not coming back for it), whose clients are then woken through
//! their [`Waker`]. A waiting command holds nothing, so waiting cannot deadlock: every
//! holder finishes on its own (storage completes, a send completes or times out, a host
//! sends the data it was asked for or its connection ends).
//!
//! The pool knows nothing about threads, sockets or NVMe: a thread-per-connection queue
//! and a reactor owning many queues use it the same way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use crate::buffer::{Region, SLOT_ALIGN};
use crate::limits::{MAX_DATA_BYTES, MDTS};

/// Smallest block (one page).
const PAGE: usize = SLOT_ALIGN;
/// Block sizes are PAGE << order, order 0..ORDERS; the largest is MAX_DATA_BYTES.
const ORDERS: usize = MDTS as usize + 1;
const TOP: u8 = (ORDERS - 1) as u8;
const NIL: u32 = u32::MAX;
const NOT_FREE: u8 = u8::MAX;

const _: () = assert!(PAGE << TOP == MAX_DATA_BYTES);

/// The smallest order whose block holds `bytes`, if any does.
fn order_for(bytes: usize) -> Option<u8> {
    let pages = bytes.max(1).div_ceil(PAGE).next_power_of_two();
    let order = pages.trailing_zeros() as u8;
    (order <= TOP).then_some(order)
}

/// Buddy allocator over page indices (pure bookkeeping, no memory of its own).
#[derive(Debug)]
struct Buddy {
    heads: [u32; ORDERS],
    next: Vec<u32>,
    prev: Vec<u32>,
    /// Order of the free block starting at this page, or NOT_FREE.
    free_order: Vec<u8>,
    free_pages: usize,
}

impl Buddy {
    /// `pages` must be a multiple of the top block's pages.
    fn new(pages: usize) -> Buddy {
        let mut b = Buddy {
            heads: [NIL; ORDERS],
            next: vec![NIL; pages],
            prev: vec![NIL; pages],
            free_order: vec![NOT_FREE; pages],
            free_pages: pages,
        };
        // Pushed highest first, so the lowest addresses are handed out first and a
        // lightly used pool keeps touching the same few pages.
        let top = 1usize << TOP;
        for p in (0..pages / top).rev() {
            b.push(TOP, (p * top) as u32);
        }
        b
    }

    fn push(&mut self, order: u8, p: u32) {
        let k = order as usize;
        self.free_order[p as usize] = order;
        self.prev[p as usize] = NIL;
        self.next[p as usize] = self.heads[k];
        if self.heads[k] != NIL {
            self.prev[self.heads[k] as usize] = p;
        }
        self.heads[k] = p;
    }

    fn remove(&mut self, order: u8, p: u32) {
        let (n, pr) = (self.next[p as usize], self.prev[p as usize]);
        if pr == NIL {
            self.heads[order as usize] = n;
        } else {
            self.next[pr as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = pr;
        }
        self.free_order[p as usize] = NOT_FREE;
    }

    fn alloc(&mut self, order: u8) -> Option<u32> {
        let mut j = (order..=TOP).find(|&j| self.heads[j as usize] != NIL)?;
        let p = self.heads[j as usize];
        self.remove(j, p);
        while j > order {
            j -= 1;
            self.push(j, p + (1 << j));
        }
        self.free_pages -= 1 << order;
        Some(p)
    }

    fn free(&mut self, page: u32, order: u8) {
        debug_assert_eq!(self.free_order[page as usize], NOT_FREE, "double free");
        self.free_pages += 1 << order;
        let (mut p, mut k) = (page, order);
        while k < TOP {
            let buddy = p ^ (1 << k);
            if self.free_order.get(buddy as usize) != Some(&k) {
                break;
            }
            self.remove(k, buddy);
            p = p.min(buddy);
            k += 1;
        }
        self.push(k, p);
    }
}

/// A block handed to a waiting client, not yet picked up.
#[derive(Debug, Clone, Copy)]
struct Grant {
    tag: u32,
    page: u32,
    order: u8,
}

#[derive(Debug, Clone, Copy)]
struct Ticket {
    client: u32,
    tag: u32,
    order: u8,
}

#[derive(Debug, Default)]
struct ClientSlot {
    waker: Option<Waker>,
    granted: Vec<Grant>,
    /// Tickets it may have at once (its share of the FIFO's reserved capacity).
    max_waiting: usize,
}

#[derive(Debug)]
struct Inner {
    buddy: Buddy,
    waiters: VecDeque<Ticket>,
    /// Sum of the registered clients' `max_waiting`: the FIFO never holds more, and its
    /// capacity is kept at least this, so queueing a ticket never allocates.
    tickets_max: usize,
    clients: Vec<ClientSlot>,
    vacant: Vec<u32>,
}

impl Inner {
    /// Hands free blocks to the oldest tickets, in order, while the oldest one fits.
    fn grant(&mut self) {
        while let Some(t) = self.waiters.front().copied() {
            let Some(page) = self.buddy.alloc(t.order) else {
                break;
            };
            self.waiters.pop_front();
            let c = &mut self.clients[t.client as usize];
            c.granted.push(Grant {
                tag: t.tag,
                page,
                order: t.order,
            });
            if let Some(w) = &c.waker {
                w.wake_by_ref();
            }
        }
    }
}

/// A bounded pool of page-aligned data buffers shared by every queue of a target.
#[derive(Debug)]
pub struct BufPool {
    region: Region,
    inner: Mutex<Inner>,
}

impl BufPool {
    /// A pool of `bytes` (rounded down to whole [`MAX_DATA_BYTES`] blocks, at least one).
    /// Only address space is reserved here; pages become resident as buffers are used.
    pub fn new(bytes: usize) -> std::io::Result<Arc<BufPool>> {
        let tops = (bytes / MAX_DATA_BYTES).max(1);
        let region = Region::new(tops * MAX_DATA_BYTES)?;
        let pages = region.len() / PAGE;
        Ok(Arc::new(BufPool {
            region,
            inner: Mutex::new(Inner {
                buddy: Buddy::new(pages),
                waiters: VecDeque::new(),
                tickets_max: 0,
                clients: Vec::new(),
                vacant: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is plain bookkeeping, updated without panicking paths in between.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Total bytes the pool may hand out.
    pub fn capacity_bytes(&self) -> usize {
        self.region.len()
    }

    /// Bytes currently handed out (held by commands or granted and not yet picked up).
    pub fn in_use_bytes(&self) -> usize {
        self.capacity_bytes() - self.lock().buddy.free_pages * PAGE
    }

    /// Tickets waiting for a buffer.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    /// A buffer of at least `bytes` now, if one is free, even while others wait (for
    /// data that has already arrived and cannot wait in line). None if none is free or
    /// `bytes` exceeds [`MAX_DATA_BYTES`].
    pub fn try_take(self: &Arc<Self>, bytes: usize) -> Option<Buf> {
        let order = order_for(bytes)?;
        let page = self.lock().buddy.alloc(order)?;
        Some(Buf {
            pool: self.clone(),
            page,
            order,
        })
    }

    /// Registers a client that may have up to `max_waiting` tickets at once, woken
    /// through `waker` when a grant arrives. Reserves the capacity its waiting needs.
    pub fn client(self: &Arc<Self>, waker: Waker, max_waiting: usize) -> PoolClient {
        let mut g = self.lock();
        g.tickets_max += max_waiting;
        let room = g.tickets_max.saturating_sub(g.waiters.len());
        g.waiters.reserve(room);
        let slot = ClientSlot {
            waker: Some(waker),
            granted: Vec::with_capacity(max_waiting),
            max_waiting,
        };
        let id = match g.vacant.pop() {
            Some(id) => {
                g.clients[id as usize] = slot;
                id
            }
            None => {
                g.clients.push(slot);
                (g.clients.len() - 1) as u32
            }
        };
        drop(g);
        PoolClient {
            pool: self.clone(),
            id,
            spare: Vec::with_capacity(max_waiting),
        }
    }

    fn release(self: &Arc<Self>, page: u32, order: u8) {
        let mut g = self.lock();
        g.buddy.free(page, order);
        g.grant();
    }
}

/// One user of the pool (a queue): takes buffers or waits for them in the FIFO.
#[derive(Debug)]
pub struct PoolClient {
    pool: Arc<BufPool>,
    id: u32,
    /// Swapped with the pool's grant list, so picking grants up allocates nothing.
    spare: Vec<Grant>,
}

impl PoolClient {
    /// The pool.
    pub fn pool(&self) -> &Arc<BufPool> {
        &self.pool
    }

    /// A buffer of at least `bytes` (at most [`MAX_DATA_BYTES`]) now if nobody is waiting
    /// and one is free; otherwise a ticket `tag` joins the FIFO and None is returned: the
    /// buffer arrives later through [`PoolClient::take_granted`], after a wake-up.
    pub fn take_or_wait(&self, tag: u32, bytes: usize) -> Option<Buf> {
        let order = order_for(bytes).expect("callers validate transfers against MAX_DATA_BYTES");
        let mut g = self.pool.lock();
        if g.waiters.is_empty() {
            if let Some(page) = g.buddy.alloc(order) {
                return Some(Buf {
                    pool: self.pool.clone(),
                    page,
                    order,
                });
            }
        }
        debug_assert!(g.waiters.len() < g.waiters.capacity(), "capacity reserved");
        g.waiters.push_back(Ticket {
            client: self.id,
            tag,
            order,
        });
        None
    }

    /// Calls `f(tag, buffer)` for every grant that arrived, oldest first.
    pub fn take_granted(&mut self, mut f: impl FnMut(u32, Buf)) {
        {
            let mut g = self.pool.lock();
            std::mem::swap(&mut g.clients[self.id as usize].granted, &mut self.spare);
        }
        for t in self.spare.drain(..) {
            let buf = Buf {
                pool: self.pool.clone(),
                page: t.page,
                order: t.order,
            };
            f(t.tag, buf);
        }
    }
}

impl Drop for PoolClient {
    /// Cancels the client's tickets and returns what was granted and never picked up.
    fn drop(&mut self) {
        let mut g = self.pool.lock();
        let id = self.id;
        g.waiters.retain(|t| t.client != id);
        let granted = std::mem::take(&mut g.clients[id as usize].granted);
        for t in &granted {
            g.buddy.free(t.page, t.order);
        }
        g.tickets_max -= g.clients[id as usize].max_waiting;
        g.clients[id as usize] = ClientSlot::default();
        g.vacant.push(id);
        g.grant();
    }
}

/// One page-aligned block of the pool, owned by one command; returned on drop.
#[derive(Debug)]
pub struct Buf {
    pool: Arc<BufPool>,
    page: u32,
    order: u8,
}

impl Buf {
    /// Usable bytes (the request rounded up to a power-of-two number of pages).
    pub fn len(&self) -> usize {
        PAGE << self.order
    }

    /// Always false: a buffer has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: the buddy allocator only hands out blocks inside the region, so
        // page * PAGE + len() <= region.len().
        unsafe { self.pool.region.as_ptr().add(self.page as usize * PAGE) }
    }

    /// Start of the buffer, for storage I/O that completes later (the caller keeps the
    /// `Buf` alive, and touches it through nothing else, until then).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.base()
    }

    /// The first `len` bytes.
    pub fn as_slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.len(), "buffer access out of range");
        // SAFETY: in bounds (checked); the block belongs to this Buf alone (the buddy
        // allocator never hands out overlapping blocks), and mapped memory is always
        // initialised (zeroes or earlier data).
        unsafe { std::slice::from_raw_parts(self.base(), len) }
    }

    /// The first `len` bytes, mutably.
    pub fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.len(), "buffer access out of range");
        // SAFETY: as in `as_slice`; &mut self means no other slice of this block lives.
        unsafe { std::slice::from_raw_parts_mut(self.base(), len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.pool.release(self.page, self.order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    const K4: usize = 4096;
    const TOP_BYTES: usize = MAX_DATA_BYTES;

    #[test]
    fn sizes_round_up_to_power_of_two_pages() {
        assert_eq!(order_for(1), Some(0));
        assert_eq!(order_for(4096), Some(0));
        assert_eq!(order_for(4097), Some(1));
        assert_eq!(order_for(12 * 1024), Some(2));
        assert_eq!(order_for(MAX_DATA_BYTES), Some(TOP));
        assert_eq!(order_for(MAX_DATA_BYTES + 1), None);
    }

    #[test]
    fn the_bound_is_respected_and_buffers_are_aligned_and_disjoint() {
        let pool = BufPool::new(4 * TOP_BYTES + 5000).expect("pool");
        assert_eq!(pool.capacity_bytes(), 4 * TOP_BYTES);
        let mut held = Vec::new();
        while let Some(b) = pool.try_take(3 * K4) {
            held.push(b);
        }
        assert_eq!(
            held.len(),
            4 * TOP_BYTES / (4 * K4),
            "16 KiB blocks fill it exactly"
        );
        assert_eq!(pool.in_use_bytes(), pool.capacity_bytes());
        assert!(pool.try_take(1).is_none(), "nothing beyond the bound");
        let mut starts: Vec<usize> = held.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
        assert!(starts.iter().all(|s| s % K4 == 0));
        starts.sort_unstable();
        assert!(starts.windows(2).all(|w| w[1] - w[0] >= 4 * K4));
        for (i, b) in held.iter_mut().enumerate() {
            b.as_mut_slice(8)[0] = i as u8;
        }
        for (i, b) in held.iter().enumerate() {
            assert_eq!(b.as_slice(1)[0], i as u8);
        }
        drop(held);
        assert_eq!(pool.in_use_bytes(), 0);
        let whole: Vec<_> = (0..4).filter_map(|_| pool.try_take(TOP_BYTES)).collect();
        assert_eq!(whole.len(), 4, "freed blocks merge back into whole ones");
    }

    #[test]
    fn waiting_is_fifo_and_a_returned_buffer_wakes_the_oldest_ticket() {
        let pool = BufPool::new(TOP_BYTES).expect("pool");
        let (wa, a_waker) = counter();
        let (wb, b_waker) = counter();
        let mut a = pool.client(a_waker, 4);
        let mut b = pool.client(b_waker, 4);
        let mut first = a.take_or_wait(0, TOP_BYTES / 2).expect("free now");
        let second = b.take_or_wait(0, TOP_BYTES / 2).expect("free now");
        assert!(a.take_or_wait(1, TOP_BYTES).is_none(), "full: A waits");
        assert!(
            b.take_or_wait(1, K4).is_none(),
            "B waits behind A, though 4 KiB is small"
        );
        assert!(pool.try_take(K4).is_none());
        assert_eq!(pool.waiting(), 2);
        first.as_mut_slice(1)[0] = 7;
        drop(first);
        assert_eq!(
            wa.0.load(Ordering::SeqCst),
            0,
            "half the pool does not fit A's ticket"
        );
        assert_eq!(wb.0.load(Ordering::SeqCst), 0, "B may not overtake A");
        drop(second);
        assert_eq!(
            wa.0.load(Ordering::SeqCst),
            1,
            "A woken once its ticket fits"
        );
        assert_eq!(wb.0.load(Ordering::SeqCst), 0, "nothing left for B yet");
        let mut got = Vec::new();
        a.take_granted(|tag, buf| got.push((tag, buf)));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.len()), (1, TOP_BYTES));
        drop(got);
        assert_eq!(
            wb.0.load(Ordering::SeqCst),
            1,
            "B woken when A's buffer came back"
        );
        let mut got_b = Vec::new();
        b.take_granted(|tag, buf| got_b.push((tag, buf.len())));
        assert_eq!(got_b, vec![(1, K4)]);
        assert_eq!(
            pool.in_use_bytes(),
            0,
            "B's grant was dropped with the closure"
        );
        assert_eq!(pool.waiting(), 0);
    }

    #[test]
    fn the_fifo_has_room_for_every_ticket_its_clients_may_hold() {
        let pool = BufPool::new(TOP_BYTES).expect("pool");
        let clients: Vec<_> = (0..3).map(|_| pool.client(counter().1, 100)).collect();
        assert!(
            pool.lock().waiters.capacity() >= 300,
            "no allocation when queueing"
        );
        let _all = pool.try_take(TOP_BYTES).expect("free");
        for c in &clients {
            for tag in 0..100 {
                assert!(c.take_or_wait(tag, K4).is_none());
            }
        }
        assert_eq!(pool.waiting(), 300);
    }

    #[test]
    fn a_departing_client_cancels_its_tickets_and_returns_its_grants() {
        let pool = BufPool::new(TOP_BYTES).expect("pool");
        let (_, wa) = counter();
        let (wb, wbw) = counter();
        let a = pool.client(wa, 4);
        let b = pool.client(wbw, 4);
        let all = pool.try_take(TOP_BYTES).expect("free");
        assert!(a.take_or_wait(5, TOP_BYTES).is_none());
        assert!(b.take_or_wait(6, K4).is_none());
        drop(all); // granted to A, which never picks it up
        assert_eq!(pool.in_use_bytes(), TOP_BYTES);
        drop(a);
        assert_eq!(wb.0.load(Ordering::SeqCst), 1, "A's grant went on to B");
        drop(b);
        assert_eq!(pool.in_use_bytes(), 0);
        assert_eq!(pool.waiting(), 0);
    }

    #[test]
    fn random_take_and_return_keeps_the_books_balanced() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 64,
            ..Config::default()
        });
        let ops = prop::collection::vec(
            (any::<bool>(), 1usize..=MAX_DATA_BYTES, any::<usize>()),
            1..200,
        );
        runner
            .run(&ops, |ops| {
                let pool = BufPool::new(3 * TOP_BYTES).expect("pool");
                let mut held: Vec<Buf> = Vec::new();
                for (take, bytes, pick) in ops {
                    if take || held.is_empty() {
                        if let Some(b) = pool.try_take(bytes) {
                            prop_assert!(b.len() >= bytes && b.len() < 2 * bytes.max(K4));
                            held.push(b);
                        }
                    } else {
                        held.swap_remove(pick % held.len());
                    }
                    let used: usize = held.iter().map(Buf::len).sum();
                    prop_assert_eq!(used, pool.in_use_bytes());
                    let mut spans: Vec<(usize, usize)> =
                        held.iter().map(|b| (b.base() as usize, b.len())).collect();
                    spans.sort_unstable();
                    prop_assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
                }
                held.clear();
                prop_assert_eq!(pool.in_use_bytes(), 0);
                prop_assert!(pool.try_take(TOP_BYTES).is_some(), "everything merged back");
                Ok(())
            })
            .expect("books balanced");
    }
}
