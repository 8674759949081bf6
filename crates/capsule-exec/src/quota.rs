//! Quotas on what a call leaves in its read-write grants: bytes written to files, and files
//! (folders, hard links) created. wasmtime's WASI preview 1 has no hook for either, so the
//! functions that write or create are wrapped: each wrapper checks and counts, then calls
//! wasmtime's own implementation. A refusal is WASI's `EDQUOT`
//! (Python's `OSError: [Errno 19] ...`), which the task may catch; when it does not, the
//! failure says which quota it met.

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self, WasiSnapshotPreview1};

const WASI: &str = "wasi_snapshot_preview1";
const ERRNO_DQUOT: i32 = 19;
const ERRNO_NOENT: i32 = 44;
const OFLAGS_CREAT: i32 = 1;
const RIGHTS_FD_READ: i64 = 1 << 1;
/// Descriptors 0-2 are the standard streams, captured and capped elsewhere.
const FIRST_FILE_FD: i32 = 3;
/// POSIX's `IOV_MAX`: a longer vector is left to wasmtime to refuse.
const MAX_IOVECS: i32 = 1024;

/// What one call may write and create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileQuota {
    pub max_written: u64,
    pub max_created: u64,
}

impl FileQuota {
    pub const UNLIMITED: Self = Self { max_written: u64::MAX, max_created: u64::MAX };
}

/// What the running call has written and created, and which quota refused it, if any.
pub struct FileUsage {
    quota: FileQuota,
    written: u64,
    created: u64,
    refused: Option<Refusal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Written,
    Created,
}

impl Default for FileUsage {
    fn default() -> Self {
        Self { quota: FileQuota::UNLIMITED, written: 0, created: 0, refused: None }
    }
}

impl FileUsage {
    /// A new call (or attempt) starts from zero under `quota`.
    pub fn start_call(&mut self, quota: FileQuota) {
        self.quota = quota;
        (self.written, self.created, self.refused) = (0, 0, None);
    }

    /// Which quota refused a write or a creation during this call, in words.
    pub fn refusal(&self) -> Option<String> {
        self.refused.map(|refusal| match refusal {
            Refusal::Written => format!(
                "the task reached its `max_written` quota: {} bytes written to files, {} allowed",
                self.written, self.quota.max_written
            ),
            Refusal::Created => format!(
                "the task reached its `max_files_created` quota: {} files or folders created",
                self.quota.max_created
            ),
        })
    }

    fn may_write(&mut self, bytes: u64) -> bool {
        let fits = self.written.saturating_add(bytes) <= self.quota.max_written;
        if !fits {
            self.refused = Some(Refusal::Written);
        }
        fits
    }

    fn may_create(&mut self) -> bool {
        let fits = self.created < self.quota.max_created;
        if !fits {
            self.refused = Some(Refusal::Created);
        }
        fits
    }
}

/// Store state that counts its file writes and holds its WASI context.
pub trait CountsFiles: Send + 'static {
    fn file_usage(&mut self) -> &mut FileUsage;
    fn wasi(&mut self) -> &mut WasiP1Ctx;
}

/// Calls wasmtime's own implementation of a WASI function (which returns an errno), as its
/// linker does: with the guest's memory and the store's host-call fuel.
macro_rules! plain_wasi {
    ($caller:expr, $function:ident($($arg:expr),* $(,)?)) => {{
        let caller: &mut Caller<'_, _> = $caller;
        let fuel = caller.as_context_mut().hostcall_fuel();
        let Some(Extern::Memory(memory)) = caller.get_export(python_runtime::exports::MEMORY) else {
            return Err(wasmtime::format_err!("the module exports no memory"));
        };
        let (bytes, state) = memory.data_and_store_mut(&mut *caller);
        let wasi = state.wasi();
        wasi.set_hostcall_fuel(fuel);
        let mut memory = wiggle::GuestMemory::Unshared(bytes);
        wasi_snapshot_preview1::$function(wasi, &mut memory, $($arg),*).await?
    }};
}

/// Replaces the WASI functions of `linker` that write or create with counting wrappers
/// (after `add_to_linker_async` has defined them).
pub fn wrap_file_writes<T: CountsFiles>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap_async(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, T>, (fd, iovs, iovs_len, written): (i32, i32, i32, i32)| {
            Box::new(async move {
                if !may_write(&mut caller, fd, iovs, iovs_len) {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(&mut caller, fd_write(fd, iovs, iovs_len, written));
                count_written(&mut caller, fd, errno, written);
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "fd_pwrite",
        |mut caller: Caller<'_, T>, (fd, iovs, iovs_len, offset, written): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                if !may_write(&mut caller, fd, iovs, iovs_len) {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(&mut caller, fd_pwrite(fd, iovs, iovs_len, offset, written));
                count_written(&mut caller, fd, errno, written);
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_open",
        |mut caller: Caller<'_, T>,
         (dir, lookup, path, path_len, oflags, rights, inheriting, fdflags, opened): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i64,
            i64,
            i32,
            i32,
        )| {
            Box::new(async move {
                // Only an open that makes a new file counts: look first, without creating.
                let mut creates = false;
                if oflags & OFLAGS_CREAT != 0 {
                    let found = plain_wasi!(
                        &mut caller,
                        path_open(dir, lookup, path, path_len, 0, RIGHTS_FD_READ, 0, 0, opened)
                    );
                    match found {
                        0 => {
                            let fd = read_u32(&mut caller, opened).map_or(-1, |fd| fd as i32);
                            plain_wasi!(&mut caller, fd_close(fd));
                        }
                        ERRNO_NOENT => creates = true,
                        _ => {}
                    }
                }
                if creates && !caller.data_mut().file_usage().may_create() {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(
                    &mut caller,
                    path_open(dir, lookup, path, path_len, oflags, rights, inheriting, fdflags, opened)
                );
                if creates && errno == 0 {
                    caller.data_mut().file_usage().created += 1;
                }
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_create_directory",
        |mut caller: Caller<'_, T>, (dir, path, path_len): (i32, i32, i32)| {
            Box::new(async move {
                if !caller.data_mut().file_usage().may_create() {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(&mut caller, path_create_directory(dir, path, path_len));
                if errno == 0 {
                    caller.data_mut().file_usage().created += 1;
                }
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_link",
        |mut caller: Caller<'_, T>,
         (from_dir, lookup, from, from_len, to_dir, to, to_len): (i32, i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                if !caller.data_mut().file_usage().may_create() {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(&mut caller, path_link(from_dir, lookup, from, from_len, to_dir, to, to_len));
                if errno == 0 {
                    caller.data_mut().file_usage().created += 1;
                }
                Ok(errno)
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Whether writing the I/O vector to `fd` stays within the quota (the standard streams always do).
fn may_write<T: CountsFiles>(caller: &mut Caller<'_, T>, fd: i32, iovs: i32, count: i32) -> bool {
    if fd < FIRST_FILE_FD {
        return true;
    }
    let bytes = asked(caller, iovs, count);
    caller.data_mut().file_usage().may_write(bytes)
}

/// The bytes an I/O vector asks to write (0 when it cannot be read: wasmtime then refuses it).
fn asked<T>(caller: &mut Caller<'_, T>, iovs: i32, count: i32) -> u64 {
    if !(0..=MAX_IOVECS).contains(&count) {
        return 0;
    }
    let Some(Extern::Memory(memory)) = caller.get_export(python_runtime::exports::MEMORY) else { return 0 };
    let mut vector = vec![0u8; count as usize * 8];
    if memory.read(&*caller, iovs as u32 as usize, &mut vector).is_err() {
        return 0;
    }
    // Each entry: a u32 pointer, then a u32 length.
    vector.chunks_exact(8).map(|entry| u64::from(u32::from_le_bytes(entry[4..8].try_into().unwrap()))).sum()
}

fn count_written<T: CountsFiles>(caller: &mut Caller<'_, T>, fd: i32, errno: i32, written: i32) {
    if fd >= FIRST_FILE_FD && errno == 0 {
        let bytes = read_u32(caller, written).unwrap_or(0);
        caller.data_mut().file_usage().written += u64::from(bytes);
    }
}

fn read_u32<T>(caller: &mut Caller<'_, T>, at: i32) -> Option<u32> {
    let Some(Extern::Memory(memory)) = caller.get_export(python_runtime::exports::MEMORY) else { return None };
    let mut bytes = [0; 4];
    memory.read(&*caller, at as u32 as usize, &mut bytes).ok()?;
    Some(u32::from_le_bytes(bytes))
}
