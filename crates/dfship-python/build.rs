//! Outside maturin (a plain `cargo build` of the workspace) this crate links
//! libpython like the others; give it the same rpath.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
