//! The T1 reward path through the library API, without a model: grade K sampled responses of
//! one prompt, apply the penalties, and turn the rewards into RLOO advantages.
//!
//!     cargo run -p t1-cli --example rewards_and_advantages

use t1_algo::{advantages, Baseline};
use t1_reward::{grade, penalties, reward, GraderConfig, PenaltyConfig};

fn main() {
    let gold = "14";
    // (response, truncated): K = 4 samples of "Compute 7 + 3 * 4 - 5."
    let samples = [
        ("Attempt: 7 + 3 = 10, 10 * 4 = 40, 40 - 5 = 35.\nCheck: * binds tighter than +.\nRetry: 3 * 4 = 12, 7 + 12 = 19, 19 - 5 = 14.\nVerify: 14 + 5 = 19. Correct.\n\\boxed{14}", false),
        ("Attempt: 3 * 4 = 12, 7 + 12 = 19, 19 - 5 = 13.\nVerify: 13 + 5 = 18. Correct.\n\\boxed{13}", false),
        ("Attempt: 3 * 4 = 12, 7 + 12 = 19, 19 - 5 = 14.\nCheck: every step is right.\n\\boxed{\\dfrac{28}{2}}", false),
        ("Attempt: 3 * 4 = 12, 12 * 4 = 48, 48 * 4 = 192, 192 * 4", true),
    ];
    let (grader, penalty) = (GraderConfig::default(), PenaltyConfig::default());
    let rewards: Vec<f32> = samples
        .iter()
        .map(|(text, truncated)| {
            let g = grade(text, gold, &grader);
            let p = penalties(text, *truncated, &penalty);
            let r = reward(&g, &p, &penalty);
            println!("extracted {:?} correct {} penalties {:?} -> reward {r}", g.extracted, g.correct, p);
            r
        })
        .collect();
    let adv = advantages(&rewards, rewards.len(), Baseline::Rloo);
    println!("RLOO advantages: {adv:?} (sum {:.1e})", adv.iter().sum::<f32>());
}
