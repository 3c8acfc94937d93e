//! `forward_store!`: the `Store` methods a test's store wrapper does not change, each
//! forwarded to the store it wraps, so that a wrapper writes out only what it changes.
//!
//! ```ignore
//! impl Store for Wrapper {
//!     fn read_from(&self, from: Offset) -> Result<RecordIter> { /* changed */ }
//!     crate::forward_store!(inner; append, start_offset, next_offset, wait_for, ...);
//! }
//! ```
//!
//! `common::forward_store_but_append!` (the cluster tests' wrappers) expands to it.

/// Forwards the named `Store` methods to the field `$inner`. Exported at the root of
/// the test crate that includes this file, so that its own recursion (and
/// `common::forward_store_but_append!`) finds it by `$crate::forward_store!` from any
/// module.
#[macro_export]
macro_rules! forward_store {
    ($inner:ident;) => {};
    // Every method but the appends (`append`, `append_deferred`, `append_waits_for_disk`,
    // `wait_appended`) and the reads (`read_from`, `replay_from`, `poll_committed`):
    // what most wrappers leave as it is.
    ($inner:ident; all_but_appends_and_reads $(, $rest:ident)*) => {
        $crate::forward_store!(
            $inner; start_offset, next_offset, wait_for, wake_waiters, sync, truncate_before,
            compact_with, commit_cursor, cursor, save_snapshot, latest_snapshot $(, $rest)*
        );
    };
    ($inner:ident; append $(, $rest:ident)*) => {
        fn append(
            &self,
            batch: &[::cauce::Entry<'_>],
        ) -> ::cauce::Result<::std::ops::Range<::cauce::Offset>> {
            self.$inner.append(batch)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; read_from $(, $rest:ident)*) => {
        fn read_from(&self, from: ::cauce::Offset) -> ::cauce::Result<::cauce::store::RecordIter> {
            self.$inner.read_from(from)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; replay_from $(, $rest:ident)*) => {
        fn replay_from(
            &self,
            from: ::cauce::Offset,
            f: &mut dyn FnMut(::cauce::Offset, ::cauce::Entry<'_>),
        ) -> ::cauce::Result<::cauce::Offset> {
            self.$inner.replay_from(from, f)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; start_offset $(, $rest:ident)*) => {
        fn start_offset(&self) -> ::cauce::Offset {
            self.$inner.start_offset()
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; next_offset $(, $rest:ident)*) => {
        fn next_offset(&self) -> ::cauce::Offset {
            self.$inner.next_offset()
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; wait_for $(, $rest:ident)*) => {
        fn wait_for(
            &self,
            offset: ::cauce::Offset,
            timeout: Option<::std::time::Duration>,
        ) -> ::cauce::Offset {
            self.$inner.wait_for(offset, timeout)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; poll_committed $(, $rest:ident)*) => {
        fn poll_committed(
            &self,
            offset: ::cauce::Offset,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::cauce::Offset> {
            self.$inner.poll_committed(offset, cx)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; wake_waiters $(, $rest:ident)*) => {
        fn wake_waiters(&self) {
            self.$inner.wake_waiters()
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; sync $(, $rest:ident)*) => {
        fn sync(&self) -> ::cauce::Result<()> {
            self.$inner.sync()
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; truncate_before $(, $rest:ident)*) => {
        fn truncate_before(&self, offset: ::cauce::Offset) -> ::cauce::Result<()> {
            self.$inner.truncate_before(offset)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; compact_with $(, $rest:ident)*) => {
        fn compact_with(
            &self,
            options: ::cauce::store::CompactOptions,
        ) -> ::cauce::Result<::cauce::store::Compaction> {
            self.$inner.compact_with(options)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; commit_cursor $(, $rest:ident)*) => {
        fn commit_cursor(&self, name: &str, offset: ::cauce::Offset) -> ::cauce::Result<()> {
            self.$inner.commit_cursor(name, offset)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; cursor $(, $rest:ident)*) => {
        fn cursor(&self, name: &str) -> ::cauce::Result<Option<::cauce::Offset>> {
            self.$inner.cursor(name)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; save_snapshot $(, $rest:ident)*) => {
        fn save_snapshot(
            &self,
            name: &str,
            offset: ::cauce::Offset,
            blob: &[u8],
        ) -> ::cauce::Result<()> {
            self.$inner.save_snapshot(name, offset, blob)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; latest_snapshot $(, $rest:ident)*) => {
        fn latest_snapshot(
            &self,
            name: &str,
        ) -> ::cauce::Result<Option<::cauce::store::Snapshot>> {
            self.$inner.latest_snapshot(name)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; append_waits_for_disk $(, $rest:ident)*) => {
        fn append_waits_for_disk(&self) -> bool {
            self.$inner.append_waits_for_disk()
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; append_deferred $(, $rest:ident)*) => {
        fn append_deferred(
            &self,
            batch: &[::cauce::Entry<'_>],
        ) -> ::cauce::Result<::cauce::store::Deferred> {
            self.$inner.append_deferred(batch)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
    ($inner:ident; wait_appended $(, $rest:ident)*) => {
        fn wait_appended(&self, end: ::cauce::Offset) -> ::cauce::Result<()> {
            self.$inner.wait_appended(end)
        }
        $crate::forward_store!($inner; $($rest),*);
    };
}
