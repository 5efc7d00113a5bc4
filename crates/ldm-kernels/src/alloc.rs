//! The process's allocator policy for tensor-sized buffers.
//!
//! Every candle operation allocates its output, and a training step frees and reallocates the same few hundred
//! buffers of 1–64 MiB each. glibc's defaults hand such blocks back to the kernel when they are freed (blocks
//! above the dynamic mmap threshold are unmapped; the heap top is trimmed above 128 KiB), so the next step
//! faults every page in again and the kernel zeroes it: a perf profile of the issue-4 training step showed 16 %
//! of its samples in page faults, page clearing and memset. [`tune`] keeps freed memory in the process
//! instead. Measured on `cargo bench -p ldm-train --bench train_step` (four steps, two runs each way): minor
//! faults 1.34 M → 0.24 M, system time 5.4 s → 1.3 s, the step 3.39/3.43 s → 2.73/2.67 s, peak RSS +2 %. On the
//! SD VAE decode to 512² (`--bench sd15 -- vae`): 40.9 s → 32.3 s, peak RSS 1144 → 1284 MiB with the threshold
//! and trim settings; turning per-block mmaps off as well took its minor faults from 2.63 M to 0.33 M and its
//! system time from 9.0 s to 1.4 s, peak RSS +1 % (both under load, so no wall-time figure).
//!
//! The price: memory freed after a peak stays with the process (its RSS does not drop back), which suits a CLI
//! run and a server that will need that memory again for the next image.
//!
//! Only the `ldm` binary and our benchmarks call it: a library must not change its host's allocator. A user's
//! own `GLIBC_TUNABLES` malloc settings win (nothing is changed then), and `LDM_ALLOC=system` keeps glibc's
//! defaults (for comparisons). On other C libraries it does nothing.

/// No block is served by its own mmap: blocks above 32 MiB (GEGLU and attention buffers of the SD UNet, the VAE
/// decoder's 512² feature maps) come from the heap too and are reused, instead of being mapped and unmapped at
/// each use. (glibc still falls back to mmap when the heap cannot grow.)
pub const MMAP_MAX: usize = 0;
/// Blocks up to this size come from the heap and are reused (glibc's ceiling for the setting on 64-bit: half of
/// its 64 MiB arena heap).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Freed memory at the top of the heap is kept up to this size.
pub const TRIM_THRESHOLD: usize = 1 << 30;
/// Each heap growth asks for this much more than needed (untouched pages cost no memory).
pub const TOP_PAD: usize = 256 << 20;

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuned {
    /// The four settings were applied.
    Applied,
    /// The user's `GLIBC_TUNABLES` already sets malloc options; nothing was changed.
    UserSettings,
    /// `LDM_ALLOC=system`: glibc's defaults were kept.
    Disabled,
    /// Not glibc: nothing to do.
    Unsupported,
    /// glibc refused a setting (the returned name); the ones before it stay applied.
    Refused(&'static str),
}

/// Sets the allocator policy described in the module docs. Call it once, first thing in `main`.
pub fn tune() -> Tuned {
    if std::env::var("LDM_ALLOC").is_ok_and(|v| v == "system") {
        return Tuned::Disabled;
    }
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return Tuned::UserSettings;
    }
    imp::tune()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::*;

    pub(super) fn tune() -> Tuned {
        let settings: [(&str, libc::c_int, usize); 4] = [
            ("M_MMAP_MAX", libc::M_MMAP_MAX, MMAP_MAX),
            ("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            ("M_TOP_PAD", libc::M_TOP_PAD, TOP_PAD),
        ];
        for (name, param, value) in settings {
            let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt only changes glibc's allocator parameters; it is safe to call at any time.
            if unsafe { libc::mallopt(param, value) } != 1 {
                return Tuned::Refused(name);
            }
        }
        Tuned::Applied
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use super::*;

    pub(super) fn tune() -> Tuned {
        Tuned::Unsupported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_takes_every_setting() {
        let got = tune();
        if std::env::var("LDM_ALLOC").is_ok_and(|v| v == "system") {
            assert_eq!(got, Tuned::Disabled);
        } else if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            assert_eq!(got, Tuned::UserSettings);
        } else if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(got, Tuned::Applied);
        } else {
            assert_eq!(got, Tuned::Unsupported);
        }
        // Memory still works after the change, across the threshold.
        let big = vec![1u8; MMAP_THRESHOLD + 1];
        assert_eq!(
            big.iter().map(|&b| usize::from(b)).sum::<usize>(),
            MMAP_THRESHOLD + 1
        );
    }
}
