//! What every driver does with an instance's root volume (skiff-storage,
//! on blocking threads): make it from the image, delete it, unmount it,
//! and its snapshots. The drivers differ in how they run the instance, not
//! in its storage.

use skiff_storage::{Pool, StorageError};

use crate::{DriverError, InstanceSpec};

/// Runs storage work on a blocking thread.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::Host(format!("storage task: {e}")))?
        .map_err(Into::into)
}

/// Makes the instance's directory and its volume over the image's rootfs.
pub async fn create(pool: &Pool, inst: &InstanceSpec) -> Result<(), DriverError> {
    if !inst.image_rootfs.is_dir() {
        return Err(DriverError::Image(format!("no unpacked rootfs at {}", inst.image_rootfs.display())));
    }
    std::fs::create_dir_all(&inst.dir)
        .map_err(|e| DriverError::Host(format!("creating the instance directory: {e}")))?;
    let (pool, name, image) = (pool.clone(), inst.name.clone(), inst.image_rootfs.clone());
    blocking(move || pool.create(&name, &image).map(drop)).await
}

/// Deletes the volume of `name`, if there is one.
pub async fn delete(pool: &Pool, name: &str) -> Result<(), DriverError> {
    match pool.open_volume(name) {
        Ok(v) => blocking(move || v.delete()).await,
        Err(StorageError::VolumeNotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unmounts the volume of `name`, if there is one.
pub async fn unmount(pool: &Pool, name: &str) -> Result<(), DriverError> {
    match pool.open_volume(name) {
        Ok(v) => blocking(move || v.unmount()).await,
        Err(StorageError::VolumeNotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Snapshots the volume of `name`.
pub async fn snapshot_create(pool: &Pool, name: &str, snap: &str) -> Result<(), DriverError> {
    let (v, s) = (pool.open_volume(name)?, snap.to_string());
    blocking(move || v.snapshot_create(&s)).await
}

/// Restores a snapshot of the (stopped) instance's volume.
pub async fn snapshot_restore(pool: &Pool, name: &str, snap: &str) -> Result<(), DriverError> {
    let (v, s) = (pool.open_volume(name)?, snap.to_string());
    blocking(move || {
        v.unmount()?;
        v.snapshot_restore(&s)
    })
    .await
}

/// Deletes a snapshot.
pub async fn snapshot_delete(pool: &Pool, name: &str, snap: &str) -> Result<(), DriverError> {
    let (v, s) = (pool.open_volume(name)?, snap.to_string());
    blocking(move || v.snapshot_delete(&s)).await
}

/// Renames a snapshot.
pub async fn snapshot_rename(pool: &Pool, name: &str, old: &str, new: &str) -> Result<(), DriverError> {
    let (v, o, n) = (pool.open_volume(name)?, old.to_string(), new.to_string());
    blocking(move || v.snapshot_rename(&o, &n)).await
}
