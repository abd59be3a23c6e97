//! What a command prints for its reader on standard output. A reader that has gone
//! (`ferry restore --dry-run | head`) ends the printing, not the command: its work and its
//! exit code are what they would have been had every line been read. Any other failure to
//! write is said once on standard error. Standard error the same (`2>&1 | head`): a line
//! that cannot be written there is dropped, as the log's are.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once standard output has failed: nothing more is written to it.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` to standard output unless it has failed before.
pub fn write(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("ferry: standard output: {}", ferry_protocol::io_reason(&e));
        }
    }
}

/// `print!` through [`write`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// `println!` through [`write`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that cannot fail the command: with standard error gone there is nobody left
/// to tell.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
