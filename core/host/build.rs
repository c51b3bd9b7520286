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
//! SGD and AdamW steps), `csrc/foreach.cpp` (one-kernel gradient norms
//! and scaling, CUDA's TF32 matmul setting), `csrc/stream.cpp` (CUDA
//! streams and events for the data path and timing) and `csrc/dist.cpp` (c10d's TCPStore,
//! ProcessGroupGloo and, when the CUDA headers are there, ProcessGroupNCCL
//! for data-parallel runs).
use std::path::Path;

fn main() {
    if let (Ok(lib), Ok("simfreeze")) = (
        std::env::var("DEP_TCH_LIBTORCH_LIB"),
        std::env::var("CARGO_PKG_NAME").as_deref(),
    ) {
        let torch = Path::new(&lib)
            .parent()
            .expect("libtorch lib has a parent")
            .to_owned();
        // NCCL needs the CUDA headers of the torch environment (the wheel's
        // nvidia/ packages; scripts/setup.sh adds the two it lacks) and
        // libtorch_cuda; without them the shim is built with Gloo only.
        let nvidia = torch.join("../nvidia");
        let cuda_include = nvidia.join("cu13/include");
        let nccl = Path::new(&lib).join("libtorch_cuda.so").exists()
            && nvidia.join("nccl/include/nccl.h").exists()
            && cuda_include.join("crt/host_config.h").exists()
            && cuda_include.join("nv/target").exists();
        // The version of the headers the shims compile against, recorded
        // in every run's provenance.
        let header = torch.join("include/torch/headeronly/version.h");
        println!("cargo:rerun-if-changed={}", header.display());
        if let Ok(text) = std::fs::read_to_string(&header) {
            let part = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("#define TORCH_VERSION_{name} ")))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(a), Some(b), Some(c)) = (part("MAJOR"), part("MINOR"), part("PATCH")) {
                println!("cargo:rustc-env=SIMFREEZE_LIBTORCH_VERSION={a}.{b}.{c}");
            }
        }
        println!("cargo:rustc-check-cfg=cfg(simfreeze_nccl)");
        println!("cargo:rerun-if-changed={}", cuda_include.display());
        cc::Build::new()
            .cpp(true)
            .file("csrc/autocast.cpp")
            .file("csrc/sgd.cpp")
            .file("csrc/adamw.cpp")
            .file("csrc/foreach.cpp")
            .file("csrc/stream.cpp")
            .include(torch.join("include"))
            .flag("-std=c++17")
            .warnings(false)
            .compile("simfreeze_shim");
        let mut dist = cc::Build::new();
        if nccl {
            dist.define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .include(&cuda_include)
                .include(nvidia.join("nccl/include"));
            println!("cargo:rustc-cfg=simfreeze_nccl");
        }
        dist.cpp(true)
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
            .compile("simfreeze_dist");
        println!("cargo:rerun-if-changed=csrc/shim.h");
        println!("cargo:rerun-if-changed=csrc/autocast.cpp");
        println!("cargo:rerun-if-changed=csrc/sgd.cpp");
        println!("cargo:rerun-if-changed=csrc/adamw.cpp");
        println!("cargo:rerun-if-changed=csrc/foreach.cpp");
        println!("cargo:rerun-if-changed=csrc/dist.cpp");
        println!("cargo:rerun-if-changed=csrc/gloo-decl");
    }
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
