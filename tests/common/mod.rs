//! What the binary's tests that need privileges check first. Each such test is `#[ignore]`d
//! with what it needs (`scripts/test` includes them where the machine allows them), and when
//! it runs where that is missing it fails saying what is missing, instead of passing.

use std::path::Path;

/// KSM's settings directory, once this process may drive KSM as `--dedup ksm` does: the
/// kernel has KSM, and the process is root (KSM's settings are system-wide).
pub fn ksm_settings() -> &'static Path {
    let ksm = Path::new("/sys/kernel/mm/ksm");
    assert!(
        ksm.join("run").exists(),
        "needs kernel KSM: there is no {}",
        ksm.join("run").display()
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root: --dedup ksm writes KSM's system-wide settings"
    );
    ksm
}
