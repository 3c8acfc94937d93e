use std::collections::VecDeque;
use std::time::Instant;
use cauce::cluster::{Cluster, Context, Handler, Pending};
struct Counter;
impl Handler for Counter {
    type State = u64; type Request = u64; type Response = u64;
    fn handle(&self, _: &mut Context<'_>, _: &[u8], t: &mut u64, a: u64) -> u64 { *t += a; *t }
}
fn ours() -> f64 {
    let store: std::sync::Arc<dyn cauce::store::Store> = if std::env::var("NULL").is_ok() { std::sync::Arc::new(null::Null::default()) } else { std::sync::Arc::new(cauce::store::MemoryStore::new()) };
    let cluster = Cluster::builder(Counter).stores(store, None).instances(4).build().unwrap();
    let keys: Vec<String> = (0..10000).map(|i| format!("user-{i:05}")).collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for c in 0..2 {
            let client = cluster.client();
            let keys = &keys;
            std::thread::Builder::new().name(format!("client-{c}")).spawn_scoped(s, move || {
                let mut w: VecDeque<Pending<u64>> = VecDeque::new();
                for i in 0..300_000usize {
                    if w.len() == 256 { w.pop_front().unwrap().wait().unwrap(); }
                    w.push_back(client.submit(&keys[(i * 7919 + c) % 10000], 1).unwrap());
                }
                for p in w { p.wait().unwrap(); }
            }).unwrap();
        }
    });
    let r = 600_000.0 / t.elapsed().as_secs_f64();
    cluster.shutdown().unwrap();
    r
}

fn base() -> f64 {
    use crossbeam_channel::{bounded, unbounded};
    let keys: Vec<std::sync::Arc<str>> = (0..10000).map(|i| format!("user-{i:05}").into()).collect();
    let (rtx, rrx): (Vec<_>, Vec<_>) = (0..2).map(|_| unbounded::<u64>()).unzip();
    let mut ws = Vec::new(); let mut hs = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = bounded::<(std::sync::Arc<str>, usize)>(1024);
        let rtx = rtx.clone();
        ws.push(tx);
        hs.push(std::thread::spawn(move || { let mut m: std::collections::HashMap<std::sync::Arc<str>, u64> = Default::default(); for (k, c) in rx { let v = m.entry(k).or_default(); *v += 1; rtx[c].send(*v).unwrap(); } }));
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for c in 0..2 {
            let (ws, keys, rx) = (&ws, &keys, &rrx[c]);
            s.spawn(move || {
                let mut out = 0;
                for i in 0..300_000usize {
                    if out == 256 { rx.recv().unwrap(); out -= 1; }
                    let k = keys[(i * 7919 + c) % 10000].clone();
                    let w = (xxhash_rust::xxh3::xxh3_64(k.as_bytes()) % 4) as usize;
                    ws[w].send((k, c)).unwrap(); out += 1;
                }
                for _ in 0..out { rx.recv().unwrap(); }
            });
        }
    });
    let r = 600_000.0 / t.elapsed().as_secs_f64();
    drop(ws); for h in hs { h.join().unwrap(); }
    r
}

fn main() {
    let mut ratios = Vec::new();
    for _ in 0..5 {
        let (a, b) = (ours(), base());
        println!("ours {a:.0} base {b:.0} ratio {:.3}", a / b);
        ratios.push(a / b);
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    println!("median ratio {:.3}", ratios[2]);
}
mod null {
    use std::ops::Range; use std::sync::atomic::{AtomicU64, Ordering}; use std::time::Duration;
    use cauce::store::*; use cauce::{Entry, Offset, Result};
    #[derive(Default)] pub struct Null(AtomicU64);
    impl Store for Null {
        fn append(&self, b: &[Entry<'_>]) -> Result<Range<Offset>> { let s = self.0.fetch_add(b.len() as u64, Ordering::SeqCst); Ok(s..s + b.len() as u64) }
        fn read_from(&self, _: Offset) -> Result<RecordIter> { Ok(Box::new(std::iter::empty())) }
        fn start_offset(&self) -> Offset { 0 }
        fn next_offset(&self) -> Offset { self.0.load(Ordering::SeqCst) }
        fn wait_for(&self, _: Offset, _: Option<Duration>) -> Offset { 0 }
        fn wake_waiters(&self) {}
        fn sync(&self) -> Result<()> { Ok(()) }
        fn truncate_before(&self, _: Offset) -> Result<()> { Ok(()) }
        fn compact(&self) -> Result<Compaction> { Ok(Compaction::default()) }
        fn commit_cursor(&self, _: &str, _: Offset) -> Result<()> { Ok(()) }
        fn cursor(&self, _: &str) -> Result<Option<Offset>> { Ok(None) }
        fn save_snapshot(&self, _: &str, _: Offset, _: &[u8]) -> Result<()> { Ok(()) }
        fn latest_snapshot(&self, _: &str) -> Result<Option<Snapshot>> { Ok(None) }
    }
}
