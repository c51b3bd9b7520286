//! Every configuration shipped in configs/ parses and resolves its model,
//! and the backbone it names is shipped with the digest it names: a typo
//! in a shipped file fails here, not on a user's machine.

use simfreeze::config::RunConfig;
use simfreeze::experiment::compare::CompareConfig;

#[test]
fn every_shipped_config_parses() {
    let root = simfreeze_tests::repo_root().join("configs");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("paper")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "ron") {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 10, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        if text.contains("finetune:") {
            let c = CompareConfig::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            c.validate().unwrap();
            c.model.resolve(10).unwrap();
            // A shipped backbone is there, with the digest the config names.
            if let Some(mut b) = c.backbone.clone() {
                b.path = simfreeze_tests::repo_root().join(&b.path);
                b.verify()
                    .unwrap_or_else(|e| panic!("{}: {}", f.display(), e.0));
                assert!(b.path.with_file_name("model.json").is_file());
            }
        } else {
            let c = RunConfig::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            c.model.resolve(10).unwrap();
        }
    }
}

#[test]
fn a_compare_config_given_to_run_says_how_to_run_it() {
    let cfg = simfreeze_tests::repo_root().join("configs/quickstart.ron");
    let out = simfreeze_tests::simfreeze(&["run", "--config", cfg.to_str().unwrap()]);
    let (_, stderr) = simfreeze_tests::text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is a `simfreeze compare` configuration")
            && stderr.contains("compare --config")
            && stderr.contains("--only baseline --seed 0")
            && !stderr.contains("Unexpected field"),
        "{stderr}"
    );
    // A run's configuration with a typo still names the key.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.ron");
    std::fs::write(&bad, "(name: \"x\", trian: ())").unwrap();
    let out = simfreeze_tests::simfreeze(&["run", "--config", bad.to_str().unwrap()]);
    let (_, stderr) = simfreeze_tests::text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("trian"), "{stderr}");
}
