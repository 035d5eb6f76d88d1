//! Test binaries of this crate embed CPython: give them an rpath to the
//! libpython pyo3 was configured against, so they run without LD_LIBRARY_PATH.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
