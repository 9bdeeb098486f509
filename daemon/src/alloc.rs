//! The process's memory allocator: one `#[global_allocator]` for `itamaed`, `itamae-bench` and
//! the tests, chosen per process from `ITAMAE_ALLOCATOR` so that every host can measure the
//! choices without a rebuild (docs/tuning.md has the figures that picked the default).
//!
//! Why it matters: candle gives every op a freshly allocated output, so a training step
//! allocates and frees its whole working set (tens of MB per op) over and over. glibc's malloc
//! serves such blocks with mmap and returns them with munmap, so every step faults its pages in
//! again and the kernel zeroes each one (~20% of a step in `perf`). mimalloc keeps freed pages
//! for a while (its purge delay) and reuses them; glibc can be told to do the same (`mallopt`).
//!
//! Values: `glibc-tuned` (the default on glibc Linux: mmap threshold at its 32 MiB maximum,
//! trimming only past 1 GiB free at the top, one arena per CPU), `glibc` (its defaults, as a
//! plain Rust program gets), `mimalloc` (the default elsewhere). Measured with `itamae-bench
//! train --allocators …`: glibc-tuned took a fifth of mimalloc's page faults per f32 LoRA step
//! and ~9% less peak RSS; decode showed no difference above the shared host's noise. The daemon
//! is long-running, so after a job the memory its steps held goes back to the system:
//! [`release_free_memory`].
//!
//! The choice is read on the process's first allocation (before `main`, with `getenv`, which
//! does not allocate) and never changes: a block must be freed by the allocator that made it.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// The allocators [`ProcessAllocator`] can route to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Mimalloc,
    Glibc,
    GlibcTuned,
}

impl Choice {
    pub const ENV: &'static str = "ITAMAE_ALLOCATOR";
    pub const ALL: [Choice; 3] = [Choice::Mimalloc, Choice::Glibc, Choice::GlibcTuned];

    pub fn name(self) -> &'static str {
        match self {
            Choice::Mimalloc => "mimalloc",
            Choice::Glibc => "glibc",
            Choice::GlibcTuned => "glibc-tuned",
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name().as_bytes() == b)
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Self {
        Self::ALL[(c - 1) as usize]
    }
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_bytes(s.as_bytes()).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|c| c.name()).collect();
            format!("unknown allocator `{s}` (one of {})", names.join(", "))
        })
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const DEFAULT: Choice = Choice::GlibcTuned;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
const DEFAULT: Choice = Choice::Mimalloc;
const UNSET: u8 = 0;
/// Set when `ITAMAE_ALLOCATOR` named no allocator, so that [`check_env`] can say so once the
/// process can print.
const BAD_ENV: u8 = 0x80;

static CHOICE: AtomicU8 = AtomicU8::new(UNSET);

#[inline]
fn current() -> Choice {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != UNSET {
        return Choice::from_code(c & !BAD_ENV);
    }
    choose()
}

#[cold]
fn choose() -> Choice {
    // SAFETY: getenv reads the environment without allocating; the pointer is only read here,
    // before any thread of this program could change the environment.
    let raw = unsafe { libc::getenv(c"ITAMAE_ALLOCATOR".as_ptr()) };
    let (choice, bad) = if raw.is_null() {
        (DEFAULT, 0)
    } else {
        // SAFETY: getenv returned a NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(raw) }.to_bytes();
        match Choice::from_bytes(v) {
            Some(c) => (c, 0),
            None => (DEFAULT, BAD_ENV),
        }
    };
    match CHOICE.compare_exchange(
        UNSET,
        choice.code() | bad,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => {
            if choice == Choice::GlibcTuned {
                tune_glibc();
            }
            choice
        }
        Err(other) => Choice::from_code(other & !BAD_ENV),
    }
}

/// glibc keeps blocks below the mmap threshold in its arenas after a free and reuses them;
/// past `M_TRIM_THRESHOLD` of free memory at the top it gives pages back by itself. Fixing
/// the threshold also stops glibc's own dynamic threshold from moving.
fn tune_glibc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc parameters; it runs before this allocator hands out
    // its first glibc block.
    unsafe {
        // 32 MiB is the most glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit): a training step's
        // per-op outputs of SmolLM2 at 4 × 512 tokens are all below it except the logits.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD);
        let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 64);
        libc::mallopt(libc::M_ARENA_MAX, cpus as libc::c_int);
    }
}

/// The allocator in use in this process.
pub fn choice() -> Choice {
    current()
}

/// Warns (once, from `main`) when `ITAMAE_ALLOCATOR` named no allocator: the default is used.
pub fn check_env() {
    if CHOICE.load(Ordering::Relaxed) & BAD_ENV != 0 {
        let v = std::env::var(Choice::ENV).unwrap_or_default();
        eprintln!(
            "warning: {}: {}; using {}",
            Choice::ENV,
            v.parse::<Choice>().err().unwrap_or_default(),
            DEFAULT.name()
        );
    }
}

/// Hands memory that the allocator keeps for reuse back to the system. The daemon calls it
/// after a job: a step's working set is kept between steps on purpose, not for ever.
pub fn release_free_memory() {
    match current() {
        Choice::Mimalloc => {
            // SAFETY: a plain call into mimalloc; `force` also purges pages freed by other
            // threads and the delayed purges.
            unsafe { libmimalloc_sys::mi_collect(true) }
        }
        Choice::Glibc | Choice::GlibcTuned => {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free pages of glibc's arenas.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Freed bytes the allocator may keep after a burst before [`release_after_burst`] hands them
/// back: a decode step's and a short prompt's working set stay (no page faults on the next
/// one); the tens of MB a long prefill's attention scores leave behind go.
pub const KEEP_FREE_BYTES: u64 = 16 << 20;

/// Training jobs in progress that keep their step's working set on purpose ([`hold_working_set`]).
static HOLDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Keeps [`release_after_burst`] from returning freed memory while it lives: a training step
/// frees and reallocates its whole working set each step, and returning it between steps
/// would fault every page in again (the reason for `glibc-tuned`).
pub struct WorkingSetHold(());

pub fn hold_working_set() -> WorkingSetHold {
    if HOLDS.fetch_add(1, Ordering::AcqRel) == 0 {
        set_trim_threshold(TRAINING_TRIM_THRESHOLD);
    }
    WorkingSetHold(())
}

impl Drop for WorkingSetHold {
    fn drop(&mut self) {
        if HOLDS.fetch_sub(1, Ordering::AcqRel) == 1 {
            set_trim_threshold(SERVING_TRIM_THRESHOLD);
        }
    }
}

/// Free bytes at the top of an arena past which glibc gives them back by itself, at the free.
/// `malloc_trim` returns the free chunks of every arena but the top only of the main one, and
/// the engine's and the pool's threads allocate in the others: while serving, a long
/// prefill's transients that merge into such a top go back when they pass this bound.
const SERVING_TRIM_THRESHOLD: libc::c_int = 32 << 20;

/// While a training job runs: its step frees and reallocates its whole working set, which
/// must stay mapped (returning it faulted every page in again each step).
const TRAINING_TRIM_THRESHOLD: libc::c_int = 1 << 30;

fn set_trim_threshold(bytes: libc::c_int) {
    if current() != Choice::GlibcTuned {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter (under glibc's own lock).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// A burst of short-lived allocations just ended (a model load, a prefill): when the allocator
/// now keeps more than [`KEEP_FREE_BYTES`] freed, it goes back to the system — unless a
/// training job holds its working set. Under `glibc-tuned` nothing else returns it: blocks
/// below the 32 MiB mmap threshold are freed into the arenas and only the top of the heap is
/// trimmed, past 1 GiB. Under mimalloc its purge delay returns pages by itself.
///
/// Measured on SmolLM2 Q4_1 (docs/ops.md, memory): a 2048-position fill in 256-token prefills
/// left 74 MB freed in the arenas, 25% of the process's resident set.
pub fn release_after_burst() {
    let Some(h) = heap_stats() else {
        return;
    };
    let holds = HOLDS.load(Ordering::Acquire);
    if holds > 0 || h.free_kept <= KEEP_FREE_BYTES {
        return;
    }
    // glibc still counts trimmed chunks as free, so `free_kept` alone would trim after every
    // burst once it passed the bound: trim when the free chunks or the resident set grew by
    // the bound since the last trim (the latter when a burst reused trimmed chunks).
    let rss = rss_bytes().map_or(0, |(now, _)| now);
    let last = *LAST_TRIM.lock().unwrap_or_else(|e| e.into_inner());
    if wants_release(holds, h.free_kept, rss, last) {
        trim();
        let rss = rss_bytes().map_or(0, |(now, _)| now);
        let free = heap_stats().map_or(0, |h| h.free_kept);
        *LAST_TRIM.lock().unwrap_or_else(|e| e.into_inner()) = (free, rss);
    }
}

/// `(free_kept, resident bytes)` right after the last trim.
static LAST_TRIM: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));

fn wants_release(holds: usize, free_kept: u64, rss: u64, last: (u64, u64)) -> bool {
    let (last_free, last_rss) = last;
    holds == 0
        && free_kept > KEEP_FREE_BYTES
        && (free_kept > last_free + KEEP_FREE_BYTES || rss > last_rss + KEEP_FREE_BYTES)
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What glibc's malloc holds: bytes handed out and live, and bytes freed into its arenas (their
/// whole pages stay resident until a trim gives them back; glibc counts trimmed chunks as
/// free still). None under mimalloc or off glibc.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapStats {
    pub in_use: u64,
    pub free_kept: u64,
}

pub fn heap_stats() -> Option<HeapStats> {
    if current() == Choice::Mimalloc {
        return None;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads glibc's counters.
        let m = unsafe { libc::mallinfo2() };
        Some(HeapStats {
            in_use: (m.uordblks + m.hblkhd) as u64,
            free_kept: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Routes every allocation to the allocator [`choice`] names.
pub struct ProcessAllocator;

// SAFETY: each call is forwarded to one allocator, the same for the whole process (the choice
// never changes once made), so a block is always freed or resized by the allocator that made it.
unsafe impl GlobalAlloc for ProcessAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match current() {
            Choice::Mimalloc => MiMalloc.alloc(layout),
            _ => System.alloc(layout),
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match current() {
            Choice::Mimalloc => MiMalloc.alloc_zeroed(layout),
            _ => System.alloc_zeroed(layout),
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match current() {
            Choice::Mimalloc => MiMalloc.dealloc(ptr, layout),
            _ => System.dealloc(ptr, layout),
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match current() {
            Choice::Mimalloc => MiMalloc.realloc(ptr, layout, new_size),
            _ => System.realloc(ptr, layout, new_size),
        }
    }
}

#[global_allocator]
static GLOBAL: ProcessAllocator = ProcessAllocator;

/// Resident set size of this process now (`VmRSS`) and at its peak (`VmHWM`), in bytes; Linux.
pub fn rss_bytes() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for c in Choice::ALL {
            assert_eq!(c.name().parse::<Choice>(), Ok(c));
            assert_eq!(Choice::from_code(c.code()), c);
        }
        let e = "jemalloc".parse::<Choice>().unwrap_err();
        assert!(e.contains("mimalloc, glibc, glibc-tuned"), "{e}");
    }

    #[test]
    fn only_a_large_burst_outside_training_is_returned() {
        const K: u64 = KEEP_FREE_BYTES;
        assert!(wants_release(0, K + 1, 300 << 20, (0, 0)));
        assert!(!wants_release(0, K, 300 << 20, (0, 0)));
        assert!(!wants_release(1, 1 << 30, 300 << 20, (0, 0)));
        // Nothing new since the last trim: the free chunks are the trimmed ones.
        assert!(!wants_release(0, 3 * K, 200 << 20, (3 * K, 200 << 20)));
        // A sequence's cache freed: the free chunks grew.
        assert!(wants_release(0, 5 * K, 200 << 20, (3 * K, 200 << 20)));
        // A burst reused trimmed chunks and freed them again: the resident set grew.
        assert!(wants_release(0, 3 * K, 240 << 20, (3 * K, 200 << 20)));
        let hold = hold_working_set();
        assert!(HOLDS.load(Ordering::Acquire) >= 1);
        drop(hold);
    }

    /// The pages of freed arena blocks are resident until the trim, and not after it (checked
    /// with `mincore`, so other tests' allocations do not blur it as they would the RSS).
    /// Runs in a child test process of its own: in this one, training tests running alongside
    /// hold their working set (a 1 GiB trim threshold) and take freed chunks again.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_trim_returns_freed_arena_pages() {
        const CHILD: &str = "ITAMAE_ALLOC_TRIM_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return trim_returns_freed_pages_here();
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "alloc::tests::the_trim_returns_freed_arena_pages",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .expect("child test process");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn trim_returns_freed_pages_here() {
        if heap_stats().is_none() {
            return; // mimalloc in this process: its own purge applies
        }
        const BLOCK: usize = 1 << 20;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8 + 1; BLOCK]).collect();
        let addrs: Vec<usize> = blocks.iter().map(|b| b.as_ptr() as usize).collect();
        let _live = vec![1u8; 4096]; // so the blocks are not only the heap's top
                                     // Whole pages inside each block (glibc's chunk headers sit at their edges).
        let resident = |addr: usize| -> usize {
            let start = (addr + 2 * page) & !(page - 1);
            let pages = BLOCK / page - 4;
            let mut v = vec![0u8; pages];
            // SAFETY: the range lies inside one of the heap's mappings (the block was
            // allocated there, and glibc never unmaps arena memory below its top within a
            // test); mincore only reports residency into `v`.
            let r =
                unsafe { libc::mincore(start as *mut libc::c_void, pages * page, v.as_mut_ptr()) };
            if r != 0 {
                return 0;
            }
            v.iter().filter(|&&b| b & 1 != 0).count()
        };
        let before: usize = addrs.iter().map(|&a| resident(a)).sum();
        drop(blocks);
        trim();
        let after: usize = addrs.iter().map(|&a| resident(a)).sum();
        let total = 64 * (BLOCK / page - 4);
        assert!(
            before > total * 9 / 10,
            "{before} of {total} resident before"
        );
        assert!(
            after < total / 2,
            "{after} of {total} still resident after the trim"
        );
    }

    #[test]
    fn allocations_work_and_release_keeps_live_blocks() {
        let v: Vec<u64> = (0..1 << 20).collect();
        let big = vec![7u8; 64 << 20];
        release_free_memory();
        assert_eq!(v[12345], 12345);
        assert!(big.iter().all(|&b| b == 7));
        assert!(rss_bytes().is_some_and(|(now, peak)| now > 0 && peak >= now));
    }
}
