//! A `Store` of the user's that panics in `append`: the panic reaches the submitter, and
//! nothing the cluster took for that request stays taken: its queue room comes back, and
//! a key that was moving with it stays where its state is. One that panics in `sync`
//! during a shutdown: the panic reaches the caller, and the cluster still drops. One
//! whose appends wait for the disk, panicking on an appender thread: the async submit
//! resolves `Error::StorePanicked`, saying whether its request was logged.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cauce::Result;
use cauce::cluster::{Cluster, Context, Handler};
use cauce::router::StickyOptions;
use cauce::store::{MemoryStore, Store};

/// A memory store whose `append` panics while `panics` is set.
struct Panicky {
    live: MemoryStore,
    panics: AtomicBool,
}

impl Store for Panicky {
    fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        if self.panics.load(Ordering::SeqCst) {
            panic!("the store failed");
        }
        self.live.append(batch)
    }
    common::forward_store_but_append!(live);
}

/// Counts each key's requests; a request of key `held` waits until `open` is set (at
/// most 30 s).
#[derive(Default)]
struct Count {
    open: Arc<AtomicBool>,
}

impl Handler for Count {
    type State = u64;
    type Request = ();
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, key: &[u8], n: &mut u64, _: ()) -> u64 {
        if key == b"held" {
            common::wait_for(&self.open, Duration::from_secs(30));
        }
        *n += 1;
        *n
    }
}

fn cluster(
    store: &Arc<Panicky>,
    placement: StickyOptions,
    queue_capacity: usize,
) -> Result<Cluster<Count>> {
    Cluster::builder(Count::default())
        .stores(store.clone(), None)
        .placement(placement)
        .queue_capacity(queue_capacity)
        .instances(2)
        .build()
}

fn panicky() -> Arc<Panicky> {
    Arc::new(Panicky {
        live: MemoryStore::new(),
        panics: AtomicBool::new(false),
    })
}

/// Submits with the store panicking, and checks the panic came through.
fn submit_while_panicking(store: &Panicky, submit: impl FnOnce()) {
    store.panics.store(true, Ordering::SeqCst);
    let outcome = catch_unwind(AssertUnwindSafe(submit));
    store.panics.store(false, Ordering::SeqCst);
    assert!(outcome.is_err(), "the store's panic reaches the submitter");
}

#[test]
fn a_panicking_append_gives_its_queue_room_back() -> Result<()> {
    let store = panicky();
    let cluster = cluster(&store, StickyOptions::default(), 1)?;
    let client = cluster.client();
    assert_eq!(client.submit("k", ())?.wait()?, 1);
    // Queues of one: room lost to a panic would refuse `try_submit` for good.
    submit_while_panicking(&store, || drop(client.submit("k", ())));
    assert_eq!(client.try_submit("k", ())?.wait()?, 2);
    submit_while_panicking(&store, || drop(client.submit_batch([("k", ())])));
    assert_eq!(client.try_submit("k", ())?.wait()?, 3);
    cluster.shutdown()
}

/// A key re-placed by the request whose append panicked: the next request finds the
/// key's state where it is, and moves it properly.
#[test]
fn a_key_moving_with_a_panicking_append_keeps_its_state() -> Result<()> {
    let store = panicky();
    // A window of 2: after two requests of the key, its instance has no room for a
    // third, so the key, once idle (a second), is placed anew on the other instance.
    // The second is wide: the key must not go idle between the other requests, and the
    // panic before the third can take a few hundred milliseconds to print its
    // backtrace (`RUST_BACKTRACE=1`, a debug build, a loaded machine).
    let placement = StickyOptions::default().window(2)?.idle_after(1_000);
    let cluster = cluster(&store, placement, 64)?;
    let client = cluster.client();
    for batch in [false, true] {
        let key = format!("k-{batch}");
        assert_eq!(client.submit(&key, ())?.wait()?, 1);
        assert_eq!(client.submit(&key, ())?.wait()?, 2);
        let home = cluster.owner_of(&key);
        std::thread::sleep(Duration::from_millis(1_100));
        submit_while_panicking(&store, || match batch {
            false => drop(client.submit(&key, ())),
            true => drop(client.submit_batch([(&key, ())])),
        });
        assert_eq!(client.submit(&key, ())?.wait()?, 3, "{key}");
        assert_ne!(cluster.owner_of(&key), home, "{key} moved");
    }
    cluster.shutdown()
}

/// A batch of several requests whose append panics gives its room back once: a queue of
/// four with one request held in its handler takes three more, not four.
#[test]
fn a_panicking_batch_append_gives_its_room_back_once() -> Result<()> {
    let store = panicky();
    let open = Arc::new(AtomicBool::new(false));
    let cluster = Cluster::builder(Count { open: open.clone() })
        .stores(store.clone(), None)
        .queue_capacity(4)
        .instances(1)
        .build()?;
    let client = cluster.client();
    let held = client.submit("held", ())?;
    submit_while_panicking(&store, || drop(client.submit_batch([("a", ()), ("b", ())])));
    let mut taken = Vec::new();
    while taken.len() < 8 {
        match client.try_submit("c", ()) {
            Ok(pending) => taken.push(pending),
            Err(cauce::Error::Busy { .. }) => break,
            Err(e) => return Err(e),
        }
    }
    open.store(true, Ordering::SeqCst);
    assert_eq!(taken.len(), 3, "room taken after the panic");
    assert_eq!(held.wait()?, 1);
    for (n, pending) in taken.into_iter().enumerate() {
        assert_eq!(pending.wait()?, n as u64 + 1);
    }
    cluster.shutdown()
}

/// A memory store whose `sync` panics while `panics` is set.
struct SyncPanics {
    live: MemoryStore,
    panics: AtomicBool,
}

impl Store for SyncPanics {
    fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn sync(&self) -> cauce::Result<()> {
        if self.panics.load(Ordering::SeqCst) {
            panic!("the store's sync failed");
        }
        self.live.sync()
    }
    common::forward_store_but_append!(live, but sync);
}

/// A shutdown whose store panics in its final sync: the panic reaches the caller, and a
/// later drop (which stops again) returns instead of waiting for the first stop to end;
/// uncaught, the unwinding drop returns too.
#[test]
fn a_shutdown_whose_store_panics_leaves_a_cluster_that_drops() {
    for caught in [true, false] {
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let stopping = std::thread::spawn(move || {
            let store = Arc::new(SyncPanics {
                live: MemoryStore::new(),
                panics: AtomicBool::new(false),
            });
            let cluster = Cluster::builder(Count::default())
                .stores(store.clone(), None)
                .instances(2)
                .build()
                .unwrap();
            assert_eq!(cluster.client().submit("k", ()).unwrap().wait().unwrap(), 1);
            store.panics.store(true, Ordering::SeqCst);
            // Set before the drop: only the drop can hang.
            finished.store(true, Ordering::SeqCst);
            if caught {
                let outcome = catch_unwind(AssertUnwindSafe(|| cluster.shutdown()));
                assert!(outcome.is_err(), "the store's panic reaches the caller");
                store.panics.store(false, Ordering::SeqCst);
                drop(cluster);
            } else {
                let _ = cluster.shutdown();
            }
        });
        common::wait_for(&done, Duration::from_secs(10));
        let since = std::time::Instant::now();
        while !stopping.is_finished() {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "caught {caught}: the drop after a panicking shutdown still waits"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let outcome = stopping.join();
        assert_eq!(outcome.is_err(), !caught, "caught {caught}");
    }
}

/// A memory store whose `save_snapshot` panics while `panics` is above zero, counting it
/// down.
struct SnapshotPanics {
    live: MemoryStore,
    panics: std::sync::atomic::AtomicU64,
}

impl Store for SnapshotPanics {
    fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn sync(&self) -> cauce::Result<()> {
        self.live.sync()
    }
    fn save_snapshot(&self, name: &str, offset: u64, blob: &[u8]) -> cauce::Result<()> {
        if self.panics.load(Ordering::SeqCst) > 0 {
            self.panics.fetch_sub(1, Ordering::SeqCst);
            panic!("the store failed to save a snapshot");
        }
        self.live.save_snapshot(name, offset, blob)
    }
    common::forward_store_but_append!(live, but sync and save_snapshot);
}

/// A store that panics while the background thread saves a checkpoint fails that
/// checkpoint, not every later one: once it saves again, checkpoints go on.
#[test]
fn a_checkpoint_that_panics_in_the_store_leaves_later_checkpoints_running() -> Result<()> {
    let store = Arc::new(SnapshotPanics {
        live: MemoryStore::new(),
        panics: std::sync::atomic::AtomicU64::new(2),
    });
    let cluster = Cluster::builder(Count::default())
        .stores(store.clone(), None)
        .checkpoint_every(50)
        .instances(2)
        .build()?;
    let client = cluster.client();
    let mut round = 0;
    // Each round's requests make a checkpoint due; the first two panic in the store.
    let since = std::time::Instant::now();
    while store.panics.load(Ordering::SeqCst) > 0 || round < 4 {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "checkpoints stopped: {:?}",
            cluster.metrics().checkpoint_offset
        );
        for i in 0..60 {
            client.submit(format!("k{}", i % 7), ())?.wait()?;
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = store.next_offset();
    // The thread takes the next due checkpoint after the panics.
    let since = std::time::Instant::now();
    loop {
        let at = store.latest_snapshot("cluster-state")?.map(|s| s.offset);
        if at.is_some_and(|at| at + 60 >= end) {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no checkpoint after the store's panics: latest at {at:?}, log at {end}"
        );
        for i in 0..60 {
            client.submit(format!("k{}", i % 7), ())?.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.shutdown()
}

/// A memory store whose appends "wait for the disk" (deferred, so that async submits
/// append on appender threads), and whose next append, or next wait on an appender
/// thread, panics once asked to.
#[derive(Default)]
struct PanicsOnDisk {
    live: MemoryStore,
    in_append: AtomicBool,
    in_wait: AtomicBool,
}

impl Store for PanicsOnDisk {
    fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        if self.in_append.swap(false, Ordering::SeqCst) {
            panic!("the store failed appending");
        }
        self.live.append(batch)
    }
    fn append_waits_for_disk(&self) -> bool {
        true
    }
    fn append_deferred(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<cauce::store::Deferred> {
        Ok(cauce::store::Deferred {
            offsets: self.append(batch)?,
            pending: true,
        })
    }
    fn wait_appended(&self, _end: u64) -> cauce::Result<()> {
        // On the appender thread only: the instance waits for the same records.
        let appender = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("cauce-append"));
        if appender && self.in_wait.swap(false, Ordering::SeqCst) {
            panic!("the store failed waiting");
        }
        // The instance's wait, once the request is queued, can come first: a success
        // there is remembered, and the submitter's wait would then not reach the store
        // (rightly: the records are durable). Held until the submitter's wait panicked.
        let since = std::time::Instant::now();
        while !appender
            && self.in_wait.load(Ordering::SeqCst)
            && since.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
    common::forward_store_but_append!(live);
}

#[test]
fn an_async_submit_whose_store_panics_says_whether_it_was_logged() -> Result<()> {
    let store = Arc::new(PanicsOnDisk::default());
    let cluster = Cluster::builder(Count::default())
        .stores(store.clone(), None)
        .instances(2)
        .build()?;
    let client = cluster.client();
    assert_eq!(common::block_on(client.submit_async("k", ()))?.wait()?, 1);

    let end = store.next_offset();
    store.in_append.store(true, Ordering::SeqCst);
    match common::block_on(client.submit_async("k", ())) {
        Err(cauce::Error::StorePanicked {
            logged: false,
            message,
        }) => {
            assert!(message.contains("appending"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.next_offset(), end, "not logged");

    store.in_wait.store(true, Ordering::SeqCst);
    match common::block_on(client.submit_async("k", ())) {
        Err(cauce::Error::StorePanicked {
            logged: true,
            message,
        }) => {
            assert!(message.contains("waiting"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.next_offset(), end + 1, "logged");
    // Handled by its instance, whose own wait for the disk succeeded.
    assert_eq!(common::block_on(client.submit_async("k", ()))?.wait()?, 3);
    // Batches alike.
    store.in_append.store(true, Ordering::SeqCst);
    let batch = common::block_on(client.submit_batch_async([("k", ()), ("j", ())]));
    assert!(
        matches!(
            batch,
            Err(cauce::Error::StorePanicked { logged: false, .. })
        ),
        "{batch:?}"
    );
    store.in_wait.store(true, Ordering::SeqCst);
    let batch = common::block_on(client.submit_batch_async([("k", ()), ("j", ())]));
    assert!(
        matches!(batch, Err(cauce::Error::StorePanicked { logged: true, .. })),
        "{batch:?}"
    );
    assert_eq!(client.submit("k", ())?.wait()?, 5);
    assert_eq!(client.submit("j", ())?.wait()?, 2);
    cluster.shutdown()
}
