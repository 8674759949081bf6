//! Quotas on what a call leaves in its read-write grants: bytes written to files, and files
//! (folders, hard links) created. wasmtime's WASI preview 1 has no hook for either, so the
//! functions that write, grow or create are wrapped: each wrapper checks and counts, then
//! calls wasmtime's own implementation. A refusal is WASI's `EDQUOT`
//! (Python's `OSError: [Errno 19] ...`), which the task may catch; when it does not, the
//! failure says which quota it met.
//!
//! What counts follows the open file, never its descriptor's number: a write counts when its
//! descriptor is a regular file (whatever its number: a file opened after `close(1)` is 1), with
//! the hole it leaves before it when it writes past the end; growing a file by truncating
//! it longer counts as much. The standard streams are captured and capped elsewhere.

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::types::{Fd, Fdflags, Filetype};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self, WasiSnapshotPreview1};

const WASI: &str = "wasi_snapshot_preview1";
const ERRNO_DQUOT: i32 = 19;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOENT: i32 = 44;
const OFLAGS_CREAT: i32 = 1;
const RIGHTS_FD_READ: i64 = 1 << 1;
/// POSIX's `IOV_MAX`: a longer vector is refused (`EINVAL`), as a POSIX system does.
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
    /// A new call under `quota`. What earlier calls in the same sandbox wrote still counts:
    /// a session's calls share one quota (each attempt of a task has a sandbox of its own).
    pub fn start_call(&mut self, quota: FileQuota) {
        self.quota = quota;
        self.refused = None;
    }

    /// Bytes written and files created so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.written, self.created)
    }

    /// Carries `totals` over from a sandbox this one replaces.
    pub fn set_totals(&mut self, (written, created): (u64, u64)) {
        (self.written, self.created) = (written, created);
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
                let charge = match charge_write(&mut caller, fd, iovs, iovs_len, None).await {
                    Ok(charge) => charge,
                    Err(errno) => return Ok(errno),
                };
                if !may_grow(&mut caller, charge) {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(&mut caller, fd_write(fd, iovs, iovs_len, written));
                count_written(&mut caller, charge, errno, written);
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "fd_pwrite",
        |mut caller: Caller<'_, T>, (fd, iovs, iovs_len, offset, written): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                let charge = match charge_write(&mut caller, fd, iovs, iovs_len, Some(offset as u64)).await {
                    Ok(charge) => charge,
                    Err(errno) => return Ok(errno),
                };
                if !may_grow(&mut caller, charge) {
                    return Ok(ERRNO_DQUOT);
                }
                let errno = plain_wasi!(&mut caller, fd_pwrite(fd, iovs, iovs_len, offset, written));
                count_written(&mut caller, charge, errno, written);
                Ok(errno)
            })
        },
    )?;
    linker.func_wrap_async(WASI, "fd_filestat_set_size", |mut caller: Caller<'_, T>, (fd, size): (i32, i64)| {
        Box::new(async move {
            // Truncating a file longer makes it grow by the difference, like a write.
            let growth = match file_size(caller.data_mut().wasi(), fd).await {
                Some(now) => (size as u64).saturating_sub(now),
                None => 0,
            };
            let charge = Some(Charge { hole: growth, bytes: 0 });
            if !may_grow(&mut caller, charge) {
                return Ok(ERRNO_DQUOT);
            }
            let errno = plain_wasi!(&mut caller, fd_filestat_set_size(fd, size));
            if errno == 0 {
                caller.data_mut().file_usage().written += growth;
            }
            Ok(errno)
        })
    })?;
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

/// What a write to a regular file may add: the hole it leaves past the end, then its bytes.
#[derive(Debug, Clone, Copy)]
struct Charge {
    hole: u64,
    bytes: u64,
}

/// What writing the I/O vector `iovs` to `fd` (at `offset`, else at its position) would
/// count: `None` when `fd` is not a regular file (a standard stream, or no descriptor: then
/// wasmtime answers). wasmtime writes only the vector's first non-empty buffer.
async fn charge_write<T: CountsFiles>(
    caller: &mut Caller<'_, T>,
    fd: i32,
    iovs: i32,
    count: i32,
    offset: Option<u64>,
) -> Result<Option<Charge>, i32> {
    if !(0..=MAX_IOVECS).contains(&count) {
        return Err(ERRNO_INVAL);
    }
    let bytes = first_buffer_len(caller, iovs, count);
    let wasi = caller.data_mut().wasi();
    let mut no_memory = wiggle::GuestMemory::Unshared(&mut []);
    let Ok(stat) = wasi.fd_fdstat_get(&mut no_memory, Fd::from(fd as u32)).await else { return Ok(None) };
    if stat.fs_filetype != Filetype::RegularFile {
        return Ok(None);
    }
    let Some(size) = file_size(wasi, fd).await else { return Ok(None) };
    let start = if stat.fs_flags.contains(Fdflags::APPEND) {
        size
    } else {
        match offset {
            Some(offset) => offset,
            None => wasi.fd_tell(&mut no_memory, Fd::from(fd as u32)).unwrap_or(size),
        }
    };
    Ok(Some(Charge { hole: start.saturating_sub(size), bytes }))
}

/// The size of the regular file open as `fd`.
async fn file_size(wasi: &mut WasiP1Ctx, fd: i32) -> Option<u64> {
    let mut no_memory = wiggle::GuestMemory::Unshared(&mut []);
    let stat = wasi.fd_filestat_get(&mut no_memory, Fd::from(fd as u32)).await.ok()?;
    (stat.filetype == Filetype::RegularFile).then_some(stat.size)
}

/// Whether `charge` stays within the quota (what is not a file always does).
fn may_grow<T: CountsFiles>(caller: &mut Caller<'_, T>, charge: Option<Charge>) -> bool {
    match charge {
        Some(Charge { hole, bytes }) => caller.data_mut().file_usage().may_write(hole.saturating_add(bytes)),
        None => true,
    }
}

/// The length of the first non-empty buffer of an I/O vector (0 when it cannot be read:
/// wasmtime then refuses it).
fn first_buffer_len<T>(caller: &mut Caller<'_, T>, iovs: i32, count: i32) -> u64 {
    let Some(Extern::Memory(memory)) = caller.get_export(python_runtime::exports::MEMORY) else { return 0 };
    let mut vector = vec![0u8; count as usize * 8];
    if memory.read(&*caller, iovs as u32 as usize, &mut vector).is_err() {
        return 0;
    }
    // Each entry: a u32 pointer, then a u32 length.
    vector
        .chunks_exact(8)
        .map(|entry| u64::from(u32::from_le_bytes(entry[4..8].try_into().unwrap())))
        .find(|len| *len > 0)
        .unwrap_or(0)
}

/// Counts what a write that `charge`d did: the bytes written, and the hole before them.
fn count_written<T: CountsFiles>(caller: &mut Caller<'_, T>, charge: Option<Charge>, errno: i32, written: i32) {
    if let (Some(charge), 0) = (charge, errno) {
        let bytes = u64::from(read_u32(caller, written).unwrap_or(0));
        let hole = if bytes > 0 { charge.hole } else { 0 };
        caller.data_mut().file_usage().written += bytes + hole;
    }
}

fn read_u32<T>(caller: &mut Caller<'_, T>, at: i32) -> Option<u32> {
    let Some(Extern::Memory(memory)) = caller.get_export(python_runtime::exports::MEMORY) else { return None };
    let mut bytes = [0; 4];
    memory.read(&*caller, at as u32 as usize, &mut bytes).ok()?;
    Some(u32::from_le_bytes(bytes))
}
