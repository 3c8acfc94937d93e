//! Runs a test of this binary as a child process and SIGKILLs it mid-work.
// Each test binary that includes this uses the one of the two it needs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs the test `test` of the current test binary as a child, with `env` set to `dir`
/// (the child's cue to do the work), waits for its first line on stdout that starts with
/// `first` (at most `first_ack`), lets it run for `after`, SIGKILLs it, and returns every
/// `ack ` line it printed. A line starting with `error` means the child could not start:
/// a failure.
///
/// `first` names a line the child prints once it has done the work the parent's checks
/// need (an acknowledged request, say): the kill comes `after` that, however slowly the
/// child got there.
pub fn run_and_kill(
    test: &str,
    env: &str,
    dir: &Path,
    first: &str,
    first_ack: Duration,
    after: Duration,
) -> Vec<String> {
    let first = first.to_string();
    let trigger = move |line: &str| line.starts_with(&first);
    let mut lines = run_and_kill_after(test, env, dir, trigger, first_ack, after);
    lines.retain(|line| line.starts_with("ack "));
    lines
}

/// [`run_and_kill`], but the kill comes `after` the first line for which `trigger`
/// returns true (it sees every line, in order), and every line the child printed is
/// returned, the last one perhaps cut short by the kill.
pub fn run_and_kill_after(
    test: &str,
    env: &str,
    dir: &Path,
    mut trigger: impl FnMut(&str) -> bool + Send + 'static,
    first_ack: Duration,
    after: Duration,
) -> Vec<String> {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            assert!(!line.starts_with("error"), "child could not start: {line}");
            if trigger(&line) {
                let _ = first_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    let _ = first_rx.recv_timeout(first_ack);
    std::thread::sleep(after);
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    reader.join().expect("stdout reader")
}
