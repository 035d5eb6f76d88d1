//! The runner (Python) and the pool (Rust) declare the protocol's numbers
//! separately; this test holds them to each other, both ways.

mod common;

use std::collections::BTreeMap;

#[test]
fn the_runner_declares_exactly_the_protocol_numbers_of_the_pool() {
    // Import the runner's embedded source as a module (not as __main__, so
    // it does not start serving) and list its public integer constants.
    let code = "import json, os, types\nmodule = types.ModuleType('dfship_runner')\n\
         exec(compile(os.environ['RUNNER_SOURCE'], 'dfship_runner.py', 'exec'), module.__dict__)\n\
         print(json.dumps({k: v for k, v in vars(module).items() \
         if k.isupper() and not k.startswith('_') and type(v) is int}))";
    let output = std::process::Command::new(common::python())
        .arg("-c")
        .arg(code)
        .env("RUNNER_SOURCE", dfship_runtime::RUNNER_SOURCE)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let python: BTreeMap<String, u64> =
        serde_json::from_slice(&output.stdout).expect("a JSON object");
    let rust: BTreeMap<String, u64> = dfship_runtime::protocol::table()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    for (name, value) in &rust {
        assert_eq!(
            python.get(name),
            Some(value),
            "{name} is {value} in protocol.rs but {:?} in dfship_runner.py",
            python.get(name)
        );
    }
    for (name, value) in &python {
        assert!(
            rust.contains_key(name),
            "dfship_runner.py declares {name} = {value}, which protocol.rs does not know"
        );
    }
}
