//! Starting the interpreter is safe from any thread, including one that
//! already holds the GIL while another thread is in the middle of start-up.
//! (Each test binary runs once per process under nextest, so start-up has
//! not happened yet when the test begins.)

mod common;

use std::sync::mpsc;
use std::time::Duration;

use pyo3::prelude::*;

#[test]
fn ensure_python_with_the_gil_held_while_another_thread_starts_up() {
    // The interpreter runs (so a thread can hold the GIL), but dfship's
    // start-up (environment, cloudpickle and pyarrow checks) has not run yet.
    dfship_codec::use_python_environment(&common::venv()).unwrap();
    let (done, results) = mpsc::channel();
    std::thread::spawn(move || {
        Python::attach(|_py| {
            // This thread holds the GIL; another one begins start-up, which
            // needs the GIL, and so waits for this thread...
            let other = done.clone();
            std::thread::spawn(move || other.send(("other thread", dfship_codec::ensure_python())));
            std::thread::sleep(Duration::from_millis(300));
            // ...which now asks for start-up too. Waiting for the other
            // thread while holding the GIL would deadlock.
            done.send(("GIL holder", dfship_codec::ensure_python()))
                .unwrap();
        });
    });
    for _ in 0..2 {
        let (who, result) = results
            .recv_timeout(Duration::from_secs(30))
            .expect("ensure_python returns in both threads (no deadlock)");
        assert!(result.is_ok(), "{who}: {result:?}");
    }
}
