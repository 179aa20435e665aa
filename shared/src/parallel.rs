//! Where the kernels' parallel loops run.
//!
//! By default they run on the current rayon pool (the global one outside any pool).
//! [`serial`] runs a closure with every parallel loop of this crate done in order on
//! the calling thread instead: an expert node with a single compute thread computes
//! a dispatch on the thread that received it, without handing it to a pool thread
//! and back (two wake-ups per dispatch, a tenth of a small model's decode step on a
//! virtual machine).

use std::cell::Cell;

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this crate's parallel loops run serially on this thread.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Whether parallel loops run serially here (inside [`serial`]).
pub fn is_serial() -> bool {
    SERIAL.with(Cell::get)
}

/// The threads a parallel loop started here would use.
pub fn threads() -> usize {
    if is_serial() {
        1
    } else {
        rayon::current_num_threads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_mode_is_scoped_and_restored_after_a_panic() {
        assert!(!is_serial());
        assert_eq!(serial(|| (is_serial(), threads())), (true, 1));
        assert!(!is_serial());
        let caught = std::panic::catch_unwind(|| serial(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(!is_serial());
        // Nested: the inner scope's end does not end the outer one.
        serial(|| {
            serial(|| ());
            assert!(is_serial());
        });
    }
}
