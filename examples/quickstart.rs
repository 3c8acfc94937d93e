//! quickstart: a keyed service on cauce's embedded defaults.
//!
//! A per-user account service (visits and points) runs on 4 instances over a log on
//! disk. It serves a Zipf-skewed load (a few users are far busier than the rest), prints
//! how the load spread over the instances, shuts down, starts again from the same
//! directory, and shows that every user's state survived.
//!
//! ```sh
//! cargo run --release --example quickstart                 # in a temporary directory
//! cargo run --release --example quickstart -- --dir data --requests 500000
//! ```

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, ClusterBuilder, Context, Handler, Pending};
use cauce::store::{LogOptions, SyncPolicy};
use rand::{RngExt, SeedableRng, rngs::SmallRng};
use rand_distr::Zipf;
use serde::{Deserialize, Serialize};

/// One user's account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Account {
    visits: u64,
    points: u64,
}

/// A visit that earns points. (Reads need no request: see `client.query` below.)
#[derive(Serialize, Deserialize)]
struct Visit {
    points: u64,
}

/// The service: all of its code is this one trait implementation.
struct Accounts;

impl Handler for Accounts {
    type State = Account;
    type Request = Visit;
    type Response = Account;

    fn handle(
        &self,
        _ctx: &mut Context<'_>,
        _user: &[u8],
        account: &mut Account,
        visit: Visit,
    ) -> Account {
        account.visits += 1;
        account.points += visit.points;
        *account
    }
}

const USERS: u64 = 10_000;
const CLIENTS: u64 = 2;
const WINDOW: usize = 512;

struct Args {
    dir: Option<PathBuf>,
    requests: u64,
}

fn args() -> Args {
    let mut args = Args {
        dir: None,
        requests: 300_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--dir", Some(d)) => args.dir = Some(d.into()),
            ("--requests", Some(n)) => {
                args.requests = n.parse().expect("--requests takes a number")
            }
            _ => {
                eprintln!("usage: quickstart [--dir DIR] [--requests N]");
                std::process::exit(2);
            }
        }
    }
    args
}

fn service(dir: &std::path::Path) -> ClusterBuilder<Accounts> {
    Cluster::builder(Accounts)
        .dir(dir)
        // Sync the log every 10 ms: a crash may lose the last 10 ms of requests. Use
        // SyncPolicy::Always (the default) when every acknowledged request must survive.
        .log_options(LogOptions::new().sync(SyncPolicy::Every {
            records: u64::MAX,
            interval: Duration::from_millis(10),
        }))
        .instances(4)
}

fn main() -> Result<(), cauce::Error> {
    let args = args();
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir().map_err(|e| cauce::Error::io("create", "temp dir", e))?;
            temp.path().to_path_buf()
        }
    };
    println!(
        "cauce quickstart: a per-user account service, 4 instances, log in {}\n",
        dir.display()
    );

    let started = Instant::now();
    let cluster = service(&dir).build()?;
    println!("started in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);

    // Who visits: Zipf(1.1) over 10,000 users, so user-00001 is far busier than most.
    let zipf = Zipf::new(USERS as f64, 1.1).expect("zipf parameters");
    let done = Arc::new(AtomicU64::new(0));
    let expected: Vec<HashMap<u64, Account>> = std::thread::scope(|s| {
        let progress = s.spawn(|| progress_bar(&done, args.requests));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let client = cluster.client();
                let done = &done;
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(c);
                    let mut mine: HashMap<u64, Account> = HashMap::new();
                    let mut window: VecDeque<Pending<Account>> = VecDeque::new();
                    for _ in 0..args.requests / CLIENTS {
                        let user = rng.sample(zipf) as u64;
                        let points = rng.random_range(1..=10);
                        let a = mine.entry(user).or_default();
                        a.visits += 1;
                        a.points += points;
                        if window.len() == WINDOW {
                            window.pop_front().expect("window").wait().expect("answer");
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        let pending = client.submit(format!("user-{user:05}"), Visit { points });
                        window.push_back(pending.expect("submit"));
                    }
                    for p in window {
                        p.wait().expect("answer");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    mine
                })
            })
            .collect();
        let expected = clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect();
        progress.join().expect("progress bar");
        expected
    });
    let elapsed = started.elapsed();

    let metrics = cluster.metrics();
    let total: u64 = metrics.instances.iter().map(|i| i.requests).sum();
    println!(
        "\n{:>9} {:>8} {:>10} {:>7} {:>9} {:>9}",
        "instance", "users", "requests", "share", "p50", "p99"
    );
    for i in &metrics.instances {
        println!(
            "{:>9} {:>8} {:>10} {:>6.1}% {:>7.0}µs {:>7.0}µs",
            i.id.to_string(),
            i.keys,
            i.requests,
            100.0 * i.requests as f64 / total as f64,
            i.p50.as_secs_f64() * 1e6,
            i.p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "\n{} requests in {:.2} s: {:.0} requests/s; busiest instance at {:.2}× the mean load",
        args.requests,
        elapsed.as_secs_f64(),
        args.requests as f64 / elapsed.as_secs_f64(),
        metrics.peak_to_mean()
    );

    cluster.shutdown()?;
    println!("\nshut down; starting again from {} ...", dir.display());
    let restarted = Instant::now();
    let cluster = service(&dir).build()?;
    println!(
        "started again in {:.1} ms (state rebuilt from the checkpoint and the log)",
        restarted.elapsed().as_secs_f64() * 1e3
    );
    let checking = Instant::now();
    let client = cluster.client();
    let mut expected_all: HashMap<u64, Account> = HashMap::new();
    for part in expected {
        for (user, a) in part {
            let e = expected_all.entry(user).or_default();
            e.visits += a.visits;
            e.points += a.points;
        }
    }
    let mut users: Vec<_> = expected_all.keys().copied().collect();
    users.sort_unstable();
    let mut survived = 0;
    for &user in &users {
        // A read: runs on the user's instance, logs nothing.
        let state = client
            .query(format!("user-{user:05}"), |a: &Account| *a)?
            .wait()?;
        if state == expected_all[&user] {
            survived += 1;
        }
    }
    println!(
        "asked every user's state: {} users in {:.1} ms",
        users.len(),
        checking.elapsed().as_secs_f64() * 1e3
    );
    for &user in users.iter().take(3) {
        let a = expected_all[&user];
        println!("  user-{user:05}: {} visits, {} points", a.visits, a.points);
    }
    println!(
        "{survived} of {} users have exactly the state they had before the restart{}",
        users.len(),
        if survived == users.len() {
            ": the state survived."
        } else {
            "!"
        }
    );
    cluster.shutdown()?;
    if survived != users.len() {
        std::process::exit(1);
    }
    Ok(())
}

fn progress_bar(done: &AtomicU64, total: u64) {
    let width = 40;
    loop {
        let d = done.load(Ordering::Relaxed).min(total);
        let filled = (d * width / total.max(1)) as usize;
        print!(
            "\r[{}{}] {:>3}%",
            "#".repeat(filled),
            " ".repeat(width as usize - filled),
            d * 100 / total.max(1)
        );
        let _ = std::io::stdout().flush();
        if d >= total {
            println!();
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
