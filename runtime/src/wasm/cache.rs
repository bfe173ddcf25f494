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
    /// The cache in `dir`, or `None` (with a warning) when another user
    /// could write there: its files are loaded as native code.
    pub fn open(dir: PathBuf, engine: &wasmtime::Engine) -> Option<Self> {
        if let Err(reason) = trusted(&dir, WRITABLE_BY_OTHERS) {
            tracing::warn!(
                dir = %dir.display(),
                "not using the compile cache, stages are compiled at every start: {reason}"
            );
            return None;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Some(CompileCache {
            dir,
            engine_hash: hasher.finish(),
        })
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
        if let Err(reason) = trusted(&path, WRITABLE_BY_GROUP_OR_OTHERS) {
            tracing::warn!(path = %path.display(), "compiling the stage again: {reason}");
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

/// Write permission for every user. A folder only its group can write to
/// is trusted: under the common umask 002 that group is the user's own, and
/// runnel makes its folders 0700.
const WRITABLE_BY_OTHERS: u32 = 0o002;
/// An entry is loaded as native code, and runnel writes its entries 0644:
/// one its group could change in place is compiled and written again.
const WRITABLE_BY_GROUP_OR_OTHERS: u32 = 0o022;

/// Whether a cache folder or file (when it exists) is one only this user,
/// or root, can change. Anyone who can put a file in the cache can have
/// their code run as runnel's user.
#[cfg(unix)]
fn trusted(path: &Path, writable_mask: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(format!("cannot read its permissions: {err}")),
    };
    let me = crate::user_id();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "it belongs to user id {}, not to this user ({me})",
            meta.uid()
        ));
    }
    if meta.mode() & writable_mask != 0 {
        return Err(format!(
            "other users can write to it (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn trusted(_path: &Path, _writable_mask: u32) -> Result<(), String> {
    Ok(())
}

fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| {
        std::fs::write(&tmp, bytes)?;
        // Readable by all, as a Lambda package's files must be for the user
        // the function runs as, and writable by this user alone, whatever
        // the umask.
        #[cfg(unix)]
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The cache's folder, readable and writable by this user alone when runnel
/// makes it.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_cache_others_can_write_to_is_not_used() {
        let engine = wasmtime::Engine::new(wasmtime::Config::new().wasm_component_model(true))
            .expect("engine");
        let root = tempfile::tempdir().expect("temp dir");
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        set_mode(&shared, 0o777);
        assert!(CompileCache::open(shared, &engine).is_none());

        let dir = root.path().join("made/by/runnel");
        let cache = CompileCache::open(dir.clone(), &engine).expect("a new folder is fine");
        let stage = runnel_tests::stage("passthrough");
        let wasm = std::fs::read(&stage).expect("stage");
        cache.compile(&engine, &wasm).expect("compiles");
        let mode = std::fs::metadata(&dir).expect("made").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the folder runnel makes is its own");

        let find = || {
            let mut file = std::fs::File::open(&stage).expect("stage");
            cache.find(&engine, &mut file).expect("reads")
        };
        assert!(find().is_some(), "its own entry is used");
        let entry = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .expect("an entry");
        let mode = std::fs::metadata(&entry)
            .expect("entry")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "whatever the umask");
        set_mode(&entry, 0o666);
        assert!(find().is_none(), "an entry others could have replaced");
        set_mode(&entry, 0o664);
        assert!(find().is_none(), "an entry its group could have replaced");
        set_mode(&entry, 0o644);
        assert!(find().is_some(), "its own entry again");
        // A folder its group alone can write to (umask 002) is used.
        set_mode(&dir, 0o770);
        assert!(CompileCache::open(dir.clone(), &engine).is_some());
        if crate::user_id() == 0 {
            std::os::unix::fs::chown(&entry, Some(65534), None).expect("chown");
            assert!(find().is_none(), "an entry of another user");
        }
    }
}
