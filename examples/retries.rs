//! retries: re-delivering payments after a crash applies each one exactly once.
//!
//! A ledger of accounts runs on the embedded log store. A producer process submits
//! payments, each with a request id (its number in the producer's stream), in batches,
//! and is killed with SIGKILL mid-stream. Like a consumer that resumes from its last
//! committed position, the restarted producer re-delivers everything after the last
//! payment it knows was answered, and more: every payment it ever sent, batched
//! differently. The cluster refuses the ones it had logged (`Error::Duplicate`), applies
//! the others, and every account's balance is checked against each payment counted once.
//!
//! ```sh
//! cargo run --release --example retries
//! ```

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, ClusterBuilder, Context, Handler, RequestId};
use serde::{Deserialize, Serialize};

/// An account: its balance, and how many payments it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Account {
    balance: u64,
    payments: u64,
}

/// The ledger: a payment adds its amount to an account.
struct Ledger;

impl Handler for Ledger {
    type State = Account;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], account: &mut Account, amount: u64) -> u64 {
        account.balance += amount;
        account.payments += 1;
        account.balance
    }
}

const PAYMENTS: u64 = 30_000;
const ACCOUNTS: u64 = 50;
const BATCH: usize = 16;

/// Payment `n`: its account and amount, a function of `n`, so that both processes agree.
fn payment(n: u64) -> (String, u64) {
    let mixed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (
        format!("acct-{:02}", mixed % ACCOUNTS),
        1 + (mixed >> 32) % 500,
    )
}

fn ledger(dir: &Path) -> ClusterBuilder<Ledger> {
    // The embedded default: `SyncPolicy::Always`, every payment fdatasync'd before its
    // submit returns; ids remembered over the last 65,536 records of the log.
    Cluster::builder(Ledger).dir(dir).instances(4)
}

/// The producer: submits payments 0.. in batches of `BATCH`, printing each payment's
/// number once it is answered, until it is killed.
fn produce(dir: &Path) -> cauce::Result<()> {
    let cluster = ledger(dir).build()?;
    let client = cluster.client();
    let mut out = std::io::stdout().lock();
    for first in (0..PAYMENTS).step_by(BATCH) {
        let batch = (first..(first + BATCH as u64).min(PAYMENTS)).map(|n| {
            let (account, amount) = payment(n);
            (account, RequestId::from(n), amount)
        });
        let pendings = client.submit_batch_with_ids(batch)?;
        for (n, pending) in (first..).zip(pendings) {
            pending.wait()?;
            writeln!(out, "{n}").map_err(|e| Error::io("write", "stdout", e))?;
        }
        out.flush().map_err(|e| Error::io("flush", "stdout", e))?;
    }
    cluster.shutdown()
}

fn main() -> cauce::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, role, dir] = args.as_slice()
        && role == "produce"
    {
        return produce(Path::new(dir));
    }
    let temp = tempfile::tempdir().map_err(|e| Error::io("create", "temp dir", e))?;
    let dir = temp.path().join("ledger");
    println!(
        "cauce retries: a ledger of {ACCOUNTS} accounts, {PAYMENTS} payments with ids, log in {}\n",
        dir.display()
    );

    // 1. The producer runs in a child process, and is killed with SIGKILL mid-stream.
    let exe = std::env::current_exe().map_err(|e| Error::io("find", "this example", e))?;
    let mut child = Command::new(exe)
        .arg("produce")
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("spawn", "the producer", e))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(Error::Config("the producer has no stdout".into()));
    };
    let mut answered = HashSet::new();
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    let kill_after = PAYMENTS / 3;
    while let Some(Ok(line)) = lines.next() {
        if let Ok(n) = line.parse::<u64>() {
            answered.insert(n);
        }
        if answered.len() as u64 >= kill_after || started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    // A moment later, at no particular point: most likely while a batch waits for its
    // fdatasync (logged, not yet answered).
    std::thread::sleep(Duration::from_micros(2_500));
    child
        .kill()
        .map_err(|e| Error::io("kill", "the producer", e))?;
    // What it printed before it died.
    answered.extend(
        lines
            .map_while(Result::ok)
            .filter_map(|l| l.parse::<u64>().ok()),
    );
    let status = child
        .wait()
        .map_err(|e| Error::io("wait", "the producer", e))?;
    // The story needs a producer killed mid-stream, not one that failed or finished.
    use std::os::unix::process::ExitStatusExt;
    if status.signal() != Some(9) || answered.is_empty() || answered.len() as u64 >= PAYMENTS {
        eprintln!(
            "the producer was not killed mid-stream ({status}, {} of {PAYMENTS} answered)",
            answered.len()
        );
        std::process::exit(1);
    }
    let sent_up_to = answered.iter().max().map_or(0, |&n| n + 1);
    println!(
        "producer killed (SIGKILL) after {} payments answered, the last #{}",
        answered.len(),
        sent_up_to.saturating_sub(1)
    );

    // 2. The ledger opens again on the same directory, and the producer re-delivers
    //    every payment from the start, in batches of another size (what was answered,
    //    what was in flight when it died, and what it never sent).
    let opened = Instant::now();
    let cluster = ledger(&dir).build()?;
    println!(
        "ledger reopened in {:.0} ms",
        opened.elapsed().as_secs_f64() * 1e3
    );
    let client = cluster.client();
    let (mut refused, mut applied, mut refused_answered) = (0u64, 0u64, 0u64);
    let numbers: Vec<u64> = (0..PAYMENTS).collect();
    for chunk in numbers.chunks(BATCH * 3 + 1) {
        let batch = chunk.iter().map(|&n| {
            let (account, amount) = payment(n);
            (account, RequestId::from(n), amount)
        });
        for (&n, pending) in chunk.iter().zip(client.submit_batch_with_ids(batch)?) {
            match pending.wait() {
                Ok(_) => applied += 1,
                Err(Error::Duplicate { .. }) => {
                    refused += 1;
                    refused_answered += u64::from(answered.contains(&n));
                }
                Err(e) => return Err(e),
            }
        }
    }

    // 3. Every account holds each payment once.
    let mut expected = vec![Account::default(); ACCOUNTS as usize];
    for n in 0..PAYMENTS {
        let (account, amount) = payment(n);
        let index: usize = account[5..].parse().unwrap_or(0);
        expected[index].balance += amount;
        expected[index].payments += 1;
    }
    let mut wrong = 0;
    for (index, want) in expected.iter().enumerate() {
        let got = client
            .query(format!("acct-{index:02}"), |a: &Account| *a)?
            .wait()?;
        if got != *want {
            wrong += 1;
            println!("  acct-{index:02}: {got:?}, expected {want:?}");
        }
    }
    let metrics = cluster.metrics();
    cluster.shutdown()?;

    println!();
    println!("| re-delivered payments                      | {PAYMENTS:>7} |");
    println!("| refused as duplicates (logged before)      | {refused:>7} |");
    println!("|   of which answered before the kill        | {refused_answered:>7} |");
    println!(
        "|   logged, but their answer lost in the kill | {:>7} |",
        refused - refused_answered
    );
    println!("| applied now (never logged before)          | {applied:>7} |");
    println!(
        "| Metrics::duplicates                        | {:>7} |",
        metrics.duplicates
    );
    println!(
        "| accounts whose balance is not the sum of each payment once | {wrong} of {ACCOUNTS} |"
    );
    if refused_answered != answered.len() as u64 || refused + applied != PAYMENTS || wrong > 0 {
        eprintln!("a payment was lost or applied twice: see above");
        std::process::exit(1);
    }
    println!("\nevery payment applied exactly once");
    Ok(())
}
