//! Strict TOML run configs: a file, then `--set section.key=value` overrides, then typed
//! deserialisation where unknown keys and bad values are errors that name the key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::TrainError;

/// Reads `path` (or the defaults when `None`), applies `sets` (`a.b=value`, value parsed as a
/// TOML literal, else taken as a string), validates the types, and returns the config and its
/// resolved TOML text (saved next to every checkpoint).
pub fn load_config<T: DeserializeOwned + Serialize + Default>(path: Option<&Path>, sets: &[String]) -> Result<(T, String), TrainError> {
    let origin = path.map(|p| p.display().to_string()).unwrap_or_else(|| "the defaults".into());
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?,
        None => String::new(),
    };
    load_config_text(&text, &origin, sets)
}

/// [`load_config`] from TOML text (`origin` names it in errors), e.g. a preset embedded in the binary.
pub fn load_config_text<T: DeserializeOwned + Serialize + Default>(text: &str, origin: &str, sets: &[String]) -> Result<(T, String), TrainError> {
    let origin = origin.to_string();
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| TrainError::Config { origin: origin.clone(), message: e.to_string() })?;
    // check the file alone first, so that its errors point at its own lines and keys
    let mut config: T =
        toml::from_str(text).map_err(|e| TrainError::Config { origin: origin.clone(), message: e.to_string().trim_end().to_string() })?;
    if !sets.is_empty() {
        let parse = |doc: &toml::Table| toml::from_str::<T>(&toml::to_string(doc).expect("toml")).map_err(|e| e.message().to_string());
        let start = doc.clone();
        for set in sets {
            apply_set(&mut doc, set)?;
        }
        config = parse(&doc).map_err(|message| {
            // name the first override after which this error appears (overrides may be valid
            // only together, e.g. a tagged enum and its fields, so all are applied first)
            let mut partial = start;
            let culprit = sets.iter().find(|set| {
                apply_set(&mut partial, set).is_ok() && parse(&partial).err().as_ref() == Some(&message)
            });
            let origin = match culprit {
                Some(set) => format!("--set {set}"),
                None => format!("{origin} with --set {}", sets.join(" --set ")),
            };
            TrainError::Config { origin, message }
        })?;
    }
    let resolved = toml::to_string(&config).expect("toml");
    Ok((config, resolved))
}

/// Applies one `a.b.c=value` override to a TOML table.
pub fn apply_set(doc: &mut toml::Table, set: &str) -> Result<(), TrainError> {
    let bad = |message: String| TrainError::Config { origin: format!("--set {set}"), message };
    let (key, raw) = set.split_once('=').ok_or_else(|| bad("expected key=value, e.g. --set train.lr=1e-4".into()))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(bad(format!("bad key {key:?}")));
    }
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut table = doc;
    for part in &path[..path.len() - 1] {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| bad(format!("{part} is not a section")))?;
    }
    table.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Train {
        lr: f64,
        steps: usize,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Run {
        train: Train,
        name: String,
    }

    #[test]
    fn sets_override_and_unknown_keys_are_named() {
        let (c, _) = load_config::<Run>(None, &["train.lr=0.5".into(), "name=abc".into()]).unwrap();
        assert_eq!(c, Run { train: Train { lr: 0.5, steps: 0 }, name: "abc".into() });
        let err = load_config::<Run>(None, &["train.lrr=0.5".into()]).unwrap_err().to_string();
        assert!(err.contains("lrr") && err.contains("--set"), "{err}");
        // a bad value names the override that brought it and what was wrong with it
        let err = load_config::<Run>(None, &["train.steps=-3".into()]).unwrap_err().to_string();
        assert!(err.contains("--set train.steps=-3") && err.contains("invalid value") && err.contains("usize"), "{err}");
        // the file's own errors name the file and the key
        let dir = std::env::temp_dir().join(format!("t1-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, "[train]\nsteps = \"many\"\n").unwrap();
        let err = load_config::<Run>(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("run.toml") && err.contains("steps") && err.contains("invalid type"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
