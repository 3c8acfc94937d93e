//! Runs a test of this binary as a child process and SIGKILLs it mid-work.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs the test `test` of the current test binary as a child, with `env` set to `dir`
/// (the child's cue to do the work), waits for its first `ack ` line on stdout (at most
/// `first_ack`), lets it run for `after`, SIGKILLs it, and returns every `ack ` line it
/// printed. A line starting with `error` means the child could not start: a failure.
pub fn run_and_kill(
    test: &str,
    env: &str,
    dir: &Path,
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
            if line.starts_with("ack ") {
                if lines.is_empty() {
                    let _ = first_tx.send(());
                }
                lines.push(line);
            }
        }
        lines
    });
    let _ = first_rx.recv_timeout(first_ack);
    std::thread::sleep(after);
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    reader.join().expect("stdout reader")
}
