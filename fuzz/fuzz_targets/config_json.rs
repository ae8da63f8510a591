//! `config.json` text through `Qwen2Config::from_json`; a config that parses is then used as
//! loading uses it (parameter count, tensor list checked against a one-tensor file) and
//! written back. Any panic, huge allocation or hang is a finding.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use t1_model::{hf, Qwen2Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Qwen2Config::from_json(text) else {
        return;
    };
    let _ = config.num_parameters();
    let _ = config.eos_token_ids();
    let shapes: HashMap<String, Vec<usize>> = [("model.norm.weight".to_string(), vec![config.hidden_size])].into();
    let _ = hf::check_tensors(&config, &shapes);
    let back = serde_json::to_string(&config).expect("a parsed config serialises");
    let again = Qwen2Config::from_json(&back).expect("a written config reads back");
    let (a, b) = (serde_json::to_value(&config).unwrap(), serde_json::to_value(&again).unwrap());
    assert!(same(&a, &b), "the config does not round-trip:\n{a}\n{b}");
});

/// Equal JSON, but for floats 1 ulp apart: serde_json's default float parser (without its
/// `float_roundtrip` feature) may read a 17-digit float 1 ulp off (fuzz/README.md).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w))),
        _ => a == b,
    }
}
