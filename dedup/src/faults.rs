//! Fault injection for tests: the system calls through which the engine changes or reads
//! memory can be made to fail on demand, so that tests see what every error path leaves
//! behind.
//!
//! Each call site names its kind ([`Syscall`]) and asks [`check`] first. Without the
//! `fault-injection` feature `check` is an empty inline function and nothing else of this
//! module exists. With it, a test arms a failure with [`fail_nth`] (or [`fail_next`]): the
//! `nth` call of that kind *made by the arming thread* from then on fails with the given
//! errno instead of reaching the kernel, once. Arming is per thread so that tests running in
//! parallel do not hit each other's faults, and so that a test driving a manual engine (its
//! passes run on the caller's thread) knows exactly which call fails.
//!
//! The sites:
//!
//! | kind | call | where |
//! | --- | --- | --- |
//! | [`Syscall::Mmap`] | `mmap(MAP_FIXED)` over a region's pages, or `madvise(MADV_DONTNEED)` of a reset in place; the stable store's read-only view | `remap.rs`, `memfds.rs` |
//! | [`Syscall::Fallocate`] | `fallocate(PUNCH_HOLE)` of a region's or the stable memfd | `memfds.rs` |
//! | [`Syscall::Pwrite`] | writes into a memfd: a new stable page, a restored page, an image page | `stable/mod.rs`, `remap.rs`, `state/image.rs` |
//! | [`Syscall::PagemapRead`] | reading `/proc/self/pagemap` | `pagemap.rs` |
//! | [`Syscall::Userfaultfd`] | opening the engine's `userfaultfd`, registering a region with it | `protect.rs` |

use rustix::io::Errno;

/// A kind of system call that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Mmap,
    Fallocate,
    Pwrite,
    PagemapRead,
    Userfaultfd,
}

#[cfg(feature = "fault-injection")]
mod armed {
    use super::{Errno, Syscall};
    use std::cell::Cell;

    /// Per kind: how many more calls pass before one fails, and with what.
    #[derive(Clone, Copy)]
    pub(super) struct Armed {
        pub(super) passes: u32,
        pub(super) errno: Errno,
    }

    thread_local! {
        pub(super) static ARMED: [Cell<Option<Armed>>; 5] = const {
            [const { Cell::new(None) }; 5]
        };
    }

    pub(super) fn slot(call: Syscall) -> usize {
        match call {
            Syscall::Mmap => 0,
            Syscall::Fallocate => 1,
            Syscall::Pwrite => 2,
            Syscall::PagemapRead => 3,
            Syscall::Userfaultfd => 4,
        }
    }
}

/// Makes the `nth` call of kind `call` (1 is the next) made by this thread fail with
/// `errno`, once. Replaces a failure of that kind armed earlier and not reached yet.
#[cfg(feature = "fault-injection")]
pub fn fail_nth(call: Syscall, nth: u32, errno: Errno) {
    assert!(nth >= 1, "the first call is 1");
    armed::ARMED.with(|armed| {
        armed[armed::slot(call)].set(Some(armed::Armed {
            passes: nth - 1,
            errno,
        }))
    });
}

/// Makes the next call of kind `call` made by this thread fail with `errno`, once.
#[cfg(feature = "fault-injection")]
pub fn fail_next(call: Syscall, errno: Errno) {
    fail_nth(call, 1, errno);
}

/// Whether a failure of kind `call` is armed on this thread and has not happened yet;
/// disarms it. A test sweeping `nth` upwards stops once a pass makes fewer calls than that.
#[cfg(feature = "fault-injection")]
pub fn take_unfired(call: Syscall) -> bool {
    armed::ARMED.with(|armed| armed[armed::slot(call)].take().is_some())
}

/// Asked by every site before its system call: the errno to fail with, if a test armed one
/// for this call.
#[cfg(feature = "fault-injection")]
pub(crate) fn check(call: Syscall) -> Result<(), Errno> {
    armed::ARMED.with(|armed| {
        let cell = &armed[armed::slot(call)];
        match cell.get() {
            None => Ok(()),
            Some(armed) if armed.passes == 0 => {
                cell.set(None);
                Err(armed.errno)
            }
            Some(armed) => {
                cell.set(Some(armed::Armed {
                    passes: armed.passes - 1,
                    ..armed
                }));
                Ok(())
            }
        }
    })
}

/// Without the `fault-injection` feature every call goes through.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn check(_call: Syscall) -> Result<(), Errno> {
    Ok(())
}
