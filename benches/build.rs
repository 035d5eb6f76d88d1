//! Bench binaries embed CPython: give them an rpath to libpython.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
