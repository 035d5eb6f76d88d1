//! The embedded Python interpreter: start-up, environment, and the few Python
//! calls the codec makes (cloudpickle and error formatting).
//!
//! A process that embeds this crate starts CPython lazily, the first time a
//! Python UDF is pickled, unpickled or called. When this crate starts the
//! interpreter itself and `VIRTUAL_ENV` is set, that virtual environment's
//! site-packages are added, so `cloudpickle`, `pyarrow` and the modules UDFs
//! import come from the user's environment. Inside a Python process (the
//! Python package) the interpreter is the host's and nothing is changed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use datafusion::error::{DataFusionError, Result};
use pyo3::exceptions::PyModuleNotFoundError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyModule};

use crate::pickled::PicklerVersions;

static STARTUP: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Starts the interpreter if needed and checks that `cloudpickle` and
/// `pyarrow` import. Cheap after the first call.
///
/// Safe to call with the GIL held: start-up needs the GIL, so a caller that
/// holds it while another thread is starting the interpreter would wait for
/// that thread while it waits for the GIL. Such a caller detaches from the
/// interpreter while it waits.
pub fn ensure_python() -> Result<()> {
    if let Some(done) = STARTUP.get() {
        return done.clone().map_err(DataFusionError::Configuration);
    }
    if is_running() {
        // The caller may hold the GIL (the limited API cannot tell): attach
        // (a no-op if it does) and detach fully while waiting.
        Python::attach(|py| py.detach(start_once))
    } else {
        start_once()
    }
}

fn start_once() -> Result<()> {
    STARTUP
        .get_or_init(|| {
            let already_running = is_running();
            Python::initialize();
            Python::attach(|py| {
                if !already_running {
                    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
                        add_environment(py, Path::new(&venv))?;
                    }
                }
                for module in ["cloudpickle", "pyarrow"] {
                    py.import(module).map_err(|e| {
                        format!(
                            "the Python environment of this process ({}) cannot import \
                             '{module}' ({e}); install it there (`pip install cloudpickle \
                             pyarrow`) or point VIRTUAL_ENV / --python-env at an environment \
                             that has it",
                            describe_interpreter(py)
                        )
                    })?;
                }
                Ok(())
            })
        })
        .clone()
        .map_err(DataFusionError::Configuration)
}

/// Whether an interpreter runs in this process (without starting one).
pub fn is_running() -> bool {
    // SAFETY: Py_IsInitialized may be called at any time, even before start-up.
    unsafe { pyo3::ffi::Py_IsInitialized() != 0 }
}

/// Adds a virtual environment's site-packages to the running interpreter, as
/// a worker's `--python-env` does. The environment must be built for the same
/// Python minor version as the interpreter this process embeds.
pub fn use_python_environment(venv: &Path) -> Result<()> {
    Python::initialize();
    Python::attach(|py| add_environment(py, venv)).map_err(DataFusionError::Configuration)
}

/// Puts the environment's site-packages (and its `.pth` entries) first on
/// `sys.path`, and, as `python -m venv` does unless
/// `include-system-site-packages = true`, hides the base interpreter's
/// site-packages, so a stale global package never shadows the environment's.
const ACTIVATE_ENVIRONMENT: &std::ffi::CStr = c"
import site, sys
if not include_system:
    hidden = set(site.getsitepackages()) | {site.getusersitepackages()}
    sys.path[:] = [p for p in sys.path if p not in hidden]
before = list(sys.path)
site.addsitedir(site_packages)
added = [p for p in sys.path if p not in before]
sys.path[:] = added + [p for p in sys.path if p not in added]
";

fn add_environment(py: Python<'_>, venv: &Path) -> std::result::Result<(), String> {
    let site_packages = site_packages_of(py, venv)?;
    let include_system = std::fs::read_to_string(venv.join("pyvenv.cfg"))
        .map(|cfg| {
            cfg.lines().any(|line| {
                let mut parts = line.splitn(2, '=');
                parts.next().map(str::trim) == Some("include-system-site-packages")
                    && parts.next().map(str::trim) == Some("true")
            })
        })
        .unwrap_or(false);
    let globals = pyo3::types::PyDict::new(py);
    globals
        .set_item("site_packages", site_packages.to_string_lossy().as_ref())
        .and_then(|_| globals.set_item("include_system", include_system))
        .and_then(|_| py.run(ACTIVATE_ENVIRONMENT, Some(&globals), None))
        .map_err(|e| format!("cannot add {} to sys.path: {e}", site_packages.display()))
}

fn site_packages_of(py: Python<'_>, venv: &Path) -> std::result::Result<PathBuf, String> {
    let version = py.version_info();
    let expected = venv
        .join("lib")
        .join(format!("python{}.{}", version.major, version.minor))
        .join("site-packages");
    if expected.is_dir() {
        return Ok(expected);
    }
    let found: Vec<String> = std::fs::read_dir(venv.join("lib"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Err(format!(
        "the Python environment {} has no {}; this process embeds Python {}.{}, so the \
         environment must be created with that version (found: {})",
        venv.display(),
        expected.display(),
        version.major,
        version.minor,
        if found.is_empty() {
            "nothing under lib/".to_string()
        } else {
            found.join(", ")
        }
    ))
}

fn describe_interpreter(py: Python<'_>) -> String {
    let executable = py
        .import("sys")
        .and_then(|sys| sys.getattr("prefix"))
        .and_then(|p| p.extract::<String>())
        .unwrap_or_else(|_| "unknown prefix".to_string());
    let version = py.version_info();
    format!(
        "Python {}.{}, prefix {executable}",
        version.major, version.minor
    )
}

fn cloudpickle(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || py.import("cloudpickle").map(Bound::unbind))
        .map(|m| m.bind(py))
}

/// The Python and cloudpickle versions of this process.
pub(crate) fn local_versions(py: Python<'_>) -> PyResult<PicklerVersions> {
    static VERSIONS: PyOnceLock<PicklerVersions> = PyOnceLock::new();
    VERSIONS
        .get_or_try_init(py, || {
            let version: String = cloudpickle(py)?.getattr("__version__")?.extract()?;
            let cloudpickle_major = version
                .split('.')
                .next()
                .and_then(|major| major.parse::<u8>().ok())
                .unwrap_or(0);
            let info = py.version_info();
            Ok(PicklerVersions {
                python_major: info.major,
                python_minor: info.minor,
                cloudpickle_major,
            })
        })
        .copied()
}

/// The helper that pickles a callable with the user's own modules by value
/// (`local_modules.py`: a `mylib.py` beside the script reaches workers that
/// cannot import it).
fn local_modules(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || {
            let source = std::ffi::CString::new(include_str!("local_modules.py"))
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
            PyModule::from_code(
                py,
                &source,
                c"dfship_local_modules.py",
                c"dfship_local_modules",
            )
            .map(Bound::unbind)
        })
        .map(|m| m.bind(py))
}

/// `cloudpickle.dumps(object)`, with the local modules it reaches by value.
pub(crate) fn dumps(py: Python<'_>, object: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let pickled = local_modules(py)?.call_method1("dumps", (object,))?;
    Ok(pickled.cast::<PyBytes>()?.as_bytes().to_vec())
}

pub(crate) fn loads(py: Python<'_>, bytes: &[u8]) -> PyResult<Py<PyAny>> {
    cloudpickle(py)?
        .call_method1("loads", (PyBytes::new(py, bytes),))
        .map(Bound::unbind)
}

/// The module a `ModuleNotFoundError` names, if that is what `error` is.
pub(crate) fn missing_module(py: Python<'_>, error: &PyErr) -> Option<String> {
    if !error.is_instance_of::<PyModuleNotFoundError>(py) {
        return None;
    }
    error
        .value(py)
        .getattr("name")
        .and_then(|name| name.extract::<Option<String>>())
        .ok()
        .flatten()
}

/// How many traceback frames an error message keeps.
const TRACEBACK_FRAMES: usize = 5;

/// `Type: message` followed by the last frames of the traceback.
pub(crate) fn describe_exception(py: Python<'_>, error: &PyErr) -> String {
    let type_name = error
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".to_string());
    let message = error
        .value(py)
        .str()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let mut text = format!("{type_name}: {message}");
    if let Some(frames) = traceback_frames(py, error) {
        text.push_str("\nTraceback (most recent call last):\n");
        text.push_str(&frames);
    }
    text
}

fn traceback_frames(py: Python<'_>, error: &PyErr) -> Option<String> {
    let traceback = error.traceback(py)?;
    let frames: Vec<String> = py
        .import("traceback")
        .and_then(|tb| tb.call_method1("format_tb", (traceback,)))
        .and_then(|frames| frames.extract())
        .ok()?;
    let start = frames.len().saturating_sub(TRACEBACK_FRAMES);
    Some(frames[start..].concat().trim_end().to_string())
}
