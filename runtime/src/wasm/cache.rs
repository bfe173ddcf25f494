//! Compiled stages on disk, so a second start does not compile again.
//!
//! The key is the BLAKE3 hash of the wasm and of the engine's compatibility
//! hash (wasmtime version, target and settings): a changed stage or a
//! different engine gets a new entry, never a stale one. Every start hashes
//! every stage to find it, so the hash is one that runs at several GB/s:
//! SHA-256 took a tenth of a Lambda cold start.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;

pub struct CompileCache {
    dir: PathBuf,
    engine_hash: u64,
}

impl CompileCache {
    pub fn new(dir: PathBuf, engine: &wasmtime::Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache {
            dir,
            engine_hash: hasher.finish(),
        }
    }

    /// The compiled stage for the wasm `file` holds, if this cache has it.
    /// The file is hashed as it is read, in small pieces: reading it whole
    /// into memory first cost more of a Lambda cold start than the hash.
    pub fn find(
        &self,
        engine: &wasmtime::Engine,
        file: &mut std::fs::File,
    ) -> std::io::Result<Option<Component>> {
        let mut hasher = self.hasher();
        hasher.update_reader(file)?;
        let path = self.entry(hasher);
        if !path.exists() {
            return Ok(None);
        }
        // SAFETY: the file is one this cache wrote with `precompile_component`
        // under a key that includes the engine's compatibility hash, and it
        // is written whole (temp file, then rename) so it is never partial.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Ok(Some(component)),
            Err(err) => {
                tracing::warn!(
                    path = %path.display(),
                    "compiled stage in the cache is unusable, compiling again: {err:#}"
                );
                Ok(None)
            }
        }
    }

    /// Compiles these wasm bytes and stores the result under their own hash
    /// (not that of an earlier read of the file, which may have changed
    /// since). A cache that cannot be written is logged and skipped; the
    /// stage still runs.
    pub fn compile(&self, engine: &wasmtime::Engine, wasm: &[u8]) -> wasmtime::Result<Component> {
        let mut hasher = self.hasher();
        hasher.update(wasm);
        let path = self.entry(hasher);
        let compiled = engine.precompile_component(wasm)?;
        if let Err(err) = write_whole(&path, &compiled) {
            tracing::warn!(
                path = %path.display(),
                "cannot write the compile cache, the next start compiles again: {err}"
            );
        }
        // SAFETY: these bytes came from `precompile_component` on this engine just now.
        let component = unsafe { Component::deserialize(engine, &compiled)? };
        Ok(component)
    }

    fn hasher(&self) -> blake3::Hasher {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.engine_hash.to_le_bytes());
        hasher
    }

    fn entry(&self, hasher: blake3::Hasher) -> PathBuf {
        self.dir
            .join(format!("{}.cwasm", hasher.finalize().to_hex()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Compiled,
}

fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
