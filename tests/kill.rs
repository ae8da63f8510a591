//! Crash safety with real processes: `t1 sft` and `t1 rl` are killed with SIGKILL at seeded
//! random points, some of them while a checkpoint is being written, and restarted with
//! `--resume` until they finish. After every kill each complete checkpoint must load, and the
//! finished run must equal an uninterrupted one bit for bit (weights, anchor, trainer state).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use t1_model::WeightDtype;
use t1_train::common::{list_checkpoints, TrainerState, STATE_FILE};

use crate::common::*;
use crate::hostile::tiny_checkpoint;
use crate::train::{rl_config, sft_config, tiny_task};

/// Where to kill a run.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after the process starts.
    After(Duration),
    /// When it starts writing its `nth` checkpoint (a new temporary directory appears), after
    /// `extra` more time.
    MidCheckpoint { nth: usize, extra: Duration },
}

/// What happened over the kills and restarts.
#[derive(Debug, Default)]
struct Outcome {
    kills: usize,
    /// Kills that landed while a checkpoint's temporary directory existed.
    mid_checkpoint: usize,
    /// The step of the newest complete checkpoint after each kill.
    resumed_from: Vec<usize>,
}

/// Temporary checkpoint directories in `out_dir`, with their inode (a directory removed and
/// made again under the same name is a new write).
fn temp_dirs(out_dir: &Path) -> HashSet<(String, u64)> {
    std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let temp = name.starts_with(".checkpoint-") && name.ends_with(".tmp");
            Some((name, e.metadata().ok()?.ino())).filter(|_| temp)
        })
        .collect()
}

/// Runs `t1 <args>` until it succeeds, killing it up to `kills` times and restarting it with
/// `--resume`. Each kill point is drawn from `rng` when the process starts: alternately a time
/// within the run's expected remaining time (from `wall`, the uninterrupted run's duration
/// for `steps` steps), and the 1st to 3rd checkpoint write plus up to 3 ms (to land in
/// different files of it). After each kill, every complete checkpoint must load.
fn run_with_kills(args: &[String], out_dir: &Path, steps: usize, wall: Duration, kills: usize, rng: &mut ChaCha8Rng, anchor: bool) -> Outcome {
    let log = out_dir.with_extension("log");
    let mut outcome = Outcome::default();
    loop {
        let done = outcome.resumed_from.last().copied().unwrap_or(0);
        let point = (outcome.kills < kills).then(|| {
            if outcome.kills % 2 == 0 {
                let remaining = wall.mul_f64((steps - done) as f64 / steps as f64);
                KillAt::After(remaining.mul_f64(rng.random_range(0.02..0.35)))
            } else {
                KillAt::MidCheckpoint { nth: rng.random_range(1..=3), extra: Duration::from_micros(rng.random_range(0..3000)) }
            }
        });
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_t1"));
        cmd.args(args);
        if outcome.kills > 0 {
            cmd.arg("--resume");
        }
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let stale = temp_dirs(out_dir);
        let mut writes = stale.clone();
        let mut child = cmd.stdout(Stdio::null()).stderr(stderr).spawn().expect("start t1");
        let started = Instant::now();
        let killed = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "t1 {args:?} failed:\n{}", std::fs::read_to_string(&log).unwrap());
                break false;
            }
            let fire = match point {
                Some(KillAt::After(d)) => started.elapsed() >= d,
                Some(KillAt::MidCheckpoint { nth, extra }) => {
                    writes.extend(temp_dirs(out_dir));
                    let fire = writes.len() - stale.len() >= nth;
                    let seen = Instant::now();
                    while fire && seen.elapsed() < extra {}
                    fire
                }
                None => false,
            };
            if fire {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break true;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        if !killed {
            return outcome;
        }
        outcome.kills += 1;
        outcome.mid_checkpoint += !temp_dirs(out_dir).is_subset(&stale) as usize;
        // the previous checkpoints are intact and loadable
        let complete = list_checkpoints(out_dir);
        for dir in &complete {
            let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
            assert!(dir.ends_with(format!("checkpoint-{:06}", state.step)), "{}", dir.display());
            t1_model::load::<FlexInner>(dir, WeightDtype::F32, &Default::default()).unwrap_or_else(|e| panic!("after a kill: {e}"));
            if anchor {
                t1_model::load::<FlexInner>(&dir.join("reference"), WeightDtype::F32, &Default::default()).unwrap_or_else(|e| panic!("after a kill: {e}"));
            }
        }
        let step = complete.last().map_or(0, |d| d.file_name().unwrap().to_string_lossy()[11..].parse().unwrap());
        outcome.resumed_from.push(step);
    }
}

/// The files of a finished run that must be bitwise equal to the uninterrupted run's.
fn assert_same_run(a: &Path, b: &Path, last_step: usize, anchor: bool) {
    let last = format!("checkpoint-{last_step:06}");
    let mut files: Vec<PathBuf> = vec!["final/model.safetensors".into(), "final/config.json".into(), format!("{last}/model.safetensors").into(), format!("{last}/{STATE_FILE}").into()];
    if anchor {
        files.push(format!("{last}/reference/model.safetensors").into());
    }
    for f in files {
        let (x, y) = (std::fs::read(a.join(&f)).unwrap(), std::fs::read(b.join(&f)).unwrap());
        assert!(x == y, "{} differs between the uninterrupted and the killed-and-resumed run", f.display());
    }
    assert!(temp_dirs(b).is_empty(), "temporary checkpoint directories left behind: {:?}", temp_dirs(b));
}

/// Runs `t1 <command> --config <config>` once uninterrupted (timed) and once killed up to
/// 12 times at points drawn from `seed`, and checks that both end with the same files.
fn kill_and_resume(dir: &Path, command: &str, config: &str, steps: usize, seed: u64, anchor: bool) {
    let path = dir.join(format!("{command}.toml"));
    std::fs::write(&path, config).unwrap();
    let args = |out: &str| -> Vec<String> {
        [command, "--config", path.to_str().unwrap(), "--set", &format!("out_dir={:?}", dir.join(out).display().to_string())].map(String::from).to_vec()
    };
    let start = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(args("uninterrupted")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wall = start.elapsed();
    let outcome = run_with_kills(&args("killed"), &dir.join("killed"), steps, wall, 12, &mut ChaCha8Rng::seed_from_u64(seed), anchor);
    eprintln!("{command}: uninterrupted {wall:?}; {outcome:?}");
    assert!(outcome.kills >= 6 && outcome.mid_checkpoint >= 2, "too few kills landed: {outcome:?}");
    assert_same_run(&dir.join("uninterrupted"), &dir.join("killed"), steps, anchor);
}

#[test]
fn kill_sft_at_random_points_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    tiny_task(dir.path());
    let steps = 30;
    let mut cfg = sft_config(dir.path(), &dir.path().join("unused"), steps);
    cfg.train.save_every = 1;
    cfg.train.keep_checkpoints = 2;
    cfg.data.eval = PathBuf::new();
    kill_and_resume(dir.path(), "sft", &toml::to_string(&cfg).unwrap(), steps, 1, false);
}

#[test]
fn kill_rl_at_random_points_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    tiny_task(dir.path());
    let model = dir.path().join("model");
    tiny_checkpoint(dir.path(), &model, 512);
    let steps = 20;
    let mut cfg = rl_config(dir.path(), &model, &dir.path().join("unused"), steps);
    cfg.train.keep_checkpoints = 2;
    kill_and_resume(dir.path(), "rl", &toml::to_string(&cfg).unwrap(), steps, 2, true);
}
