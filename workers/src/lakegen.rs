//! A deterministic example lake.

use std::path::Path;

#[derive(Debug, Clone)]
pub struct LakeSpec {
    pub users: u64,
    pub seed: u64,
}

pub fn generate(_out: &Path, _spec: &LakeSpec) -> std::io::Result<()> {
    Err(std::io::Error::other("not available in this build"))
}
