//! Link settings torch-sys cannot pass on by itself.
//!
//! torch-sys's rpath does not reach the final link of our binaries, so the
//! binary would not find libtorch at run time without `LD_LIBRARY_PATH`; and
//! with `--as-needed` the linker drops `libtorch_cuda.so` (nothing references
//! it directly), which leaves CUDA silently unavailable on GPU machines.
//!
//! For the `simfreeze` crate itself it also compiles two small C++ shims
//! for what tch's C API lacks: `csrc/autocast.cpp` (bf16 autocast; tch only
//! offers float16), `csrc/sgd.cpp` and `csrc/adamw.cpp` (libtorch's fused
//! SGD and AdamW steps) and `csrc/dist.cpp` (c10d's TCPStore and
//! ProcessGroupGloo for data-parallel runs).
fn main() {
    if let (Ok(lib), Ok("simfreeze")) = (
        std::env::var("DEP_TCH_LIBTORCH_LIB"),
        std::env::var("CARGO_PKG_NAME").as_deref(),
    ) {
        let torch = std::path::Path::new(&lib)
            .parent()
            .expect("libtorch lib has a parent")
            .to_owned();
        cc::Build::new()
            .cpp(true)
            .file("csrc/autocast.cpp")
            .file("csrc/sgd.cpp")
            .file("csrc/adamw.cpp")
            .file("csrc/dist.cpp")
            .include(torch.join("include"))
            .include(torch.join("include/torch/csrc/api/include"))
            // ProcessGroupGloo.hpp is compiled only with USE_C10D_GLOO and
            // needs gloo's headers, which the wheel does not ship:
            // csrc/gloo-decl declares the few types it names.
            .include("csrc/gloo-decl")
            .define("USE_C10D_GLOO", None)
            .flag("-std=c++17")
            .warnings(false)
            .compile("simfreeze_shim");
        println!("cargo:rerun-if-changed=csrc/autocast.cpp");
        println!("cargo:rerun-if-changed=csrc/sgd.cpp");
        println!("cargo:rerun-if-changed=csrc/adamw.cpp");
        println!("cargo:rerun-if-changed=csrc/dist.cpp");
        println!("cargo:rerun-if-changed=csrc/gloo-decl");
    }
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
