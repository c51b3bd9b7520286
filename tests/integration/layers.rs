//! `scripts/check-layers.py`, the layering check the test command runs,
//! catches what it exists for: an import cycle between top-level modules,
//! and one between the files of a folder.

use std::path::Path;
use std::process::Command;

use simfreeze_tests::repo_root;

fn write(root: &Path, file: &str, text: &str) {
    let p = root.join(file);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn check(src: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo_root().join("scripts/check-layers.py"))
        .arg(src)
        .output()
        .expect("python3 runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_cycle_between_the_files_of_a_folder_fails_the_check() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write(&src, "lib.rs", "pub mod exp;\npub mod run;\n");
    write(&src, "run.rs", "pub struct R;\n");
    write(&src, "exp/mod.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write(&src, "exp/a.rs", "use crate::exp::b::B;\npub struct A;\n");
    write(
        &src,
        "exp/c.rs",
        "use crate::run::R;\n// crate::exp::a in a comment is no import\n",
    );
    write(
        &src,
        "exp/b.rs",
        "use crate::run::R;\npub struct B;\n#[cfg(test)]\nmod tests { use crate::exp::a::A; }\n",
    );
    let (ok, out) = check(&src);
    assert!(
        ok,
        "no cycle yet (comments and tests are not imports):\n{out}"
    );
    // b imports a through a `use` group: a -> b -> a.
    write(
        &src,
        "exp/b.rs",
        "use crate::exp::{a::A, c};\npub struct B;\n",
    );
    let (ok, out) = check(&src);
    assert!(!ok, "{out}");
    assert!(out.contains("file import cycle: a -> b -> a"), "{out}");
    // The same through `super::`.
    write(&src, "exp/b.rs", "use super::a::A;\npub struct B;\n");
    let (ok, out) = check(&src);
    assert!(!ok && out.contains("file import cycle"), "{out}");
    // And a cycle between top-level modules.
    write(&src, "exp/b.rs", "pub struct B;\n");
    write(&src, "exp/a.rs", "pub struct A;\n");
    write(&src, "exp/c.rs", "pub struct C;\n");
    write(&src, "run.rs", "use crate::exp::a::A;\n");
    let (ok, out) = check(&src);
    assert!(ok, "run -> exp alone is no cycle:\n{out}");
    write(
        &src,
        "exp/mod.rs",
        "pub mod a;\npub mod b;\npub mod c;\nuse crate::run;\n",
    );
    let (ok, out) = check(&src);
    assert!(!ok && out.contains("import cycle: "), "{out}");
}
