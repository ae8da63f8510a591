//! A safetensors file through t1-model's loading path: header checks, tensor reads, then the
//! name and shape checks against a tiny Qwen2 config and, when they pass, the model build.
//! Any panic, any allocation beyond the input's size (run with -malloc_limit_mb), or a hang is
//! a finding.

#![no_main]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use t1_model::{hf, Qwen2Config, WeightDtype};

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = hf::read_safetensors(&mut Cursor::new(data), Path::new("fuzz.safetensors")) else {
        return;
    };
    // the config of the seed in fuzz/seeds/safetensors/tiny-model.safetensors
    let mut config = Qwen2Config::tiny(8, 4, 1, 2, 1);
    config.intermediate_size = 8;
    let shapes: HashMap<String, Vec<usize>> = tensors.iter().map(|(n, d)| (n.clone(), d.shape.to_vec())).collect();
    if hf::check_tensors(&config, &shapes).is_ok() {
        let device = Default::default();
        let _ = t1_model::from_named_tensors::<burn::backend::Flex>(&config, tensors, WeightDtype::F32, &device);
    }
});
