//! What a cluster refuses to open its logs on: log options with retention, and a
//! directory that is a bare `LogStore`'s.

use std::time::Duration;

use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{LogOptions, LogStore, Store};
use cauce::{Entry, Error};

#[derive(Default)]
struct Count;

impl Handler for Count {
    type State = u64;
    type Request = u64;
    type Response = u64;
    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        *total += add;
        *total
    }
}

#[test]
fn a_cluster_refuses_logs_with_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    for options in [
        LogOptions::new().retain_for(Duration::from_secs(60)),
        LogOptions::new().retain_bytes(1 << 30),
    ] {
        let built = Cluster::builder(Count)
            .dir(dir.path())
            .log_options(options)
            .instances(1)
            .build();
        match built {
            Err(Error::Config(message)) => assert!(message.contains("retention"), "{message}"),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a cluster with log retention was built"),
        }
    }
    // Nothing was created in the directory.
    assert!(!dir.path().join("input").exists());
}

#[test]
fn a_cluster_refuses_a_directory_that_is_a_bare_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = LogStore::open(dir.path(), LogOptions::new()).expect("open");
        log.append(&[Entry::new(b"k", b"v")]).expect("append");
    }
    let built = Cluster::builder(Count).dir(dir.path()).instances(1).build();
    match built {
        Err(Error::Config(message)) => {
            assert!(message.contains("LogStore"), "{message}");
            assert!(message.contains(".stores("), "{message}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a cluster opened on a bare log's directory"),
    }
    assert!(!dir.path().join("input").exists());
    // The log is as it was.
    let log = LogStore::open(dir.path(), LogOptions::new()).expect("reopen");
    assert_eq!(log.next_offset(), 1);
    drop(log);
    // One level up, or in an empty directory, the cluster opens.
    let cluster = Cluster::builder(Count)
        .dir(dir.path().join("service"))
        .instances(1)
        .build()
        .expect("a cluster in a directory of its own");
    assert_eq!(
        cluster
            .client()
            .submit(b"k", 2)
            .expect("submit")
            .wait()
            .expect("answer"),
        2
    );
    cluster.shutdown().expect("shutdown");
}
